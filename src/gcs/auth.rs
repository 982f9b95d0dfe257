//! Credentials: turns a [`CredentialsSource`] into the `authorization` header of
//! every gRPC call.
//!
//! # What it owns
//!
//! [`TokenProvider`] is the only thing the client layer sees. It is built once
//! per process (per mount) from a [`CredentialsSource`] and cloned into every
//! call; [`TokenProvider::authorization`] returns `Bearer TOKEN` (or `None` for
//! anonymous access). Where the credentials come from:
//!
//! - [`CredentialsSource::KeyFile`] (`--key-file PATH`): a JSON file of any
//!   ADC type: `service_account`, `authorized_user`, `external_account`
//!   (workload identity federation) or `impersonated_service_account`.
//! - [`CredentialsSource::Adc`], resolved once, in [`TokenProvider::new`], in
//!   the order of AIP-4110: the file named by `GOOGLE_APPLICATION_CREDENTIALS`
//!   (it must exist when set); else gcloud's ADC file
//!   (`$CLOUDSDK_CONFIG/application_default_credentials.json` when
//!   `CLOUDSDK_CONFIG` is set, else
//!   `~/.config/gcloud/application_default_credentials.json`); else the GCE
//!   metadata server (`http://metadata.google.internal`, or
//!   `http://$GCE_METADATA_HOST` when that variable is set). The metadata
//!   server is probed for a first token in `new`, so a machine with no
//!   credentials at all fails at start-up with one clear error, not at the
//!   first read.
//! - [`CredentialsSource::Anonymous`]: no header (emulator, public buckets).
//!
//! Every token requests [`SCOPES`].
//!
//! # How data flows
//!
//! ```text
//!  new(source) ── read + parse the JSON here (errors name the file) ──▶ google-cloud-auth
//!                  builder for that type ──▶ Credentials (spawns its refresh task now)
//!  authorization() ──▶ Credentials::headers(cached entity tag)
//!        │  NotModified ──▶ our cached MetadataValue (no allocation, no parse)
//!        │  New          ──▶ "authorization" header ──▶ MetadataValue (sensitive), cached
//!        └─ bounded by a timeout; a permanent failure or a timeout marks the
//!           credentials broken and they are rebuilt from the source on a later
//!           call, at most once every 30 s
//! ```
//!
//! Caching and refresh are the crate's: each `Credentials` owns a background
//! tokio task that fetches the first token as soon as it is built, then sleeps
//! until 4 minutes (240 s) before the token's expiry and fetches the next one.
//! Callers always get the cached token while it is unexpired, so they never wait
//! on a refresh unless the token actually expired (a token server that hands out
//! tokens valid for less than 240 s is re-asked every 10 s). A transient failure
//! (connection error, 5xx, 408, 429) is retried by that task every 10 s while
//! the old token stays in use until its expiry. A permanent failure (400, 401,
//! 403, ...) ends the crate's task; this module then rebuilds the credentials
//! (re-reading the file) on a later call, at most once every 30 s, so a
//! long-running mount recovers from a fixed key or a restored metadata server
//! without a restart and without hammering a token server.
//!
//! # Which crate and why
//!
//! `google-cloud-auth` 1.x, googleapis' official Rust authentication crate
//! (the one the Google Cloud Rust client libraries use), over `gcp_auth` 0.12:
//! - Sources: it covers every ADC type (service account, authorized user,
//!   external account, impersonated service account) and the metadata server.
//!   `gcp_auth` has no external-account support.
//! - Testable against loopback fakes: it honours `token_uri` in an
//!   authorized-user file and `token_url` in an external-account file, and reads
//!   the metadata server host from `GCE_METADATA_HOST` (when the builder is
//!   built, see `mds/client.rs`). `gcp_auth` hard-codes
//!   `metadata.google.internal`.
//! - TLS is rustls (reqwest 0.13, roots from `rustls-platform-verifier`): no
//!   OpenSSL. It is used without default features, which would compile aws-lc
//!   beside the ring that tonic's `tls-ring` already brings; instead
//!   [`TokenProvider::new`] installs ring as rustls' process-wide default
//!   provider (unless the process already installed one), which the crate's
//!   HTTP client and JWT signer require.
//! - It builds with Rust 1.95 (its MSRV is 1.91) beside tonic 0.14, prost 0.14
//!   and tokio 1, and is maintained with the rest of google-cloud-rust.
//!
//! Caveats of the crate that shape this module:
//! - Service-account keys never talk to a token server: the crate signs a JWT
//!   access token locally (RS256, `scope` claim, valid for one hour, AIP-4111)
//!   and `token_uri` is ignored. `new` signs the first one, so a bad private key
//!   fails at start-up.
//! - Its HTTP requests have no timeout, and its refresh task is spawned on the
//!   tokio runtime that runs `new`: [`TokenProvider::new`] should run inside
//!   the long-lived runtime that makes the calls (if that runtime shuts down,
//!   the crate would panic in the next caller; this module catches that, returns
//!   an error and rebuilds the credentials on the caller's runtime). Every call
//!   here is bounded by [`TokenProvider::authorization`]'s 30 s timeout.
//! - Only the `authorization` header is used; a `quota_project_id` in an
//!   authorized-user file (`x-goog-user-project`) is not sent.
//!
//! # Secrets
//!
//! Nothing here logs or formats a token, a private key, a refresh token or a
//! client secret: errors carry the source (file path, "metadata server URL")
//! and the crate's message with every secret value of the file redacted; the
//! header value is marked sensitive (its `Debug` prints `Sensitive`);
//! [`TokenProvider`]'s `Debug` prints only where the credentials come from.

use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use google_cloud_auth::credentials::{
    external_account, impersonated, mds, service_account, user_account, CacheableResource,
    Credentials, EntityTag,
};
use google_cloud_auth::errors::CredentialsError;
use serde_json::Value;
use tonic::metadata::{Ascii, MetadataValue};

/// The OAuth scopes every token is requested with (read-only mount for now).
pub const SCOPES: &[&str] = &["https://www.googleapis.com/auth/devstorage.read_only"];

/// Names a credentials file for Application Default Credentials.
const ADC_ENV: &str = "GOOGLE_APPLICATION_CREDENTIALS";
/// gcloud's configuration directory, when not `~/.config/gcloud`.
const CLOUDSDK_CONFIG_ENV: &str = "CLOUDSDK_CONFIG";
/// Overrides the metadata server's host (and port), read by google-cloud-auth.
const METADATA_HOST_ENV: &str = "GCE_METADATA_HOST";
const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";
const ADC_FILE_NAME: &str = "application_default_credentials.json";

/// Bound on one [`TokenProvider::authorization`] call (the crate has none). A
/// caller waits this long at most, even if the token server hangs.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the first token in [`TokenProvider::new`] (metadata server probe,
/// local signing of a service-account JWT).
const FIRST_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
/// After a permanent failure or a timeout, rebuild the credentials from their
/// source at most this often.
const REBUILD_INTERVAL: Duration = Duration::from_secs(30);

/// JSON keys whose string values are secrets: redacted from every message.
const SECRET_KEYS: &[&str] = &[
    "private_key",
    "refresh_token",
    "client_secret",
    "access_token",
    "subject_token",
    "password",
];

/// Where credentials come from.
#[derive(Debug, Clone)]
pub enum CredentialsSource {
    /// No credentials: no authorization header (emulator, public buckets).
    Anonymous,
    /// Application Default Credentials.
    Adc,
    /// A service account (or other ADC-format) JSON key file.
    KeyFile(PathBuf),
}

/// Why credentials could not be loaded or a token could not be had. Messages
/// name the source (file path, metadata server URL) and never include token or
/// key material.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The credentials file could not be read.
    #[error("cannot read {origin}: {error}")]
    Read {
        origin: String,
        error: std::io::Error,
    },
    /// The credentials file is not a JSON object with a `type`.
    #[error("{origin} is not a valid credentials file: {detail}")]
    Malformed { origin: String, detail: String },
    /// The credentials file's `type` is not one this crate can use.
    #[error(
        "{origin} has unsupported credentials type {kind:?} (supported: service_account, \
         authorized_user, external_account, impersonated_service_account)"
    )]
    UnsupportedType { origin: String, kind: String },
    /// The credentials file has the right shape but unusable content (missing
    /// field, bad private key, ...).
    #[error("{origin} holds unusable {kind} credentials: {detail}")]
    Invalid {
        origin: String,
        kind: String,
        detail: String,
    },
    /// Application Default Credentials found nothing: no file and no metadata
    /// server.
    #[error(
        "no Application Default Credentials: {ADC_ENV} is not set, {adc_file} does not exist, \
         and the metadata server {metadata} gave no token ({detail}); run `gcloud auth \
         application-default login`, or pass --key-file"
    )]
    NoAdc {
        adc_file: String,
        metadata: String,
        detail: String,
    },
    /// The token source failed (token server error, connection refused, ...).
    #[error("cannot get an access token from {origin}: {detail}")]
    Token {
        origin: String,
        detail: String,
        /// The crate's verdict: a later attempt may succeed.
        transient: bool,
    },
    /// The token source did not answer in time.
    #[error("timed out after {} s waiting for an access token from {origin}", after.as_secs())]
    Timeout { origin: String, after: Duration },
}

impl AuthError {
    /// A later attempt may succeed (the token source failed transiently or did
    /// not answer in time); false for configuration errors.
    pub fn is_transient(&self) -> bool {
        match self {
            AuthError::Token { transient, .. } => *transient,
            AuthError::Timeout { .. } => true,
            _ => false,
        }
    }
}

/// Cheap to clone; shared by every call.
#[derive(Clone)]
pub struct TokenProvider {
    /// `None` for anonymous access.
    live: Option<Arc<Live>>,
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("TokenProvider");
        match &self.live {
            None => d.field("credentials", &"anonymous"),
            Some(live) => d.field("credentials", &live.lock().describe),
        };
        d.finish()
    }
}

impl TokenProvider {
    /// Builds the provider. For KeyFile: the file must exist and parse (clear
    /// error otherwise: unreadable, malformed JSON, unsupported type). For Adc:
    /// resolve the source now (fail clearly if none is found).
    ///
    /// Must run inside the tokio runtime that will make the calls: the
    /// credentials' refresh task is spawned on it.
    pub async fn new(source: CredentialsSource) -> Result<TokenProvider, AuthError> {
        Self::with_options(source, Options::default()).await
    }

    async fn with_options(
        source: CredentialsSource,
        options: Options,
    ) -> Result<TokenProvider, AuthError> {
        let origin = match source {
            CredentialsSource::Anonymous => {
                tracing::debug!("credentials: anonymous");
                return Ok(TokenProvider { live: None });
            }
            CredentialsSource::KeyFile(path) => Origin::KeyFile(path),
            CredentialsSource::Adc => resolve_adc()?,
        };
        install_crypto_provider();
        let built = build(&origin)?;
        tracing::debug!(source = %built.describe, "credentials: loaded");
        let probe = built.probe;
        let live = Arc::new(Live {
            origin,
            options,
            state: Mutex::new(State {
                creds: built.creds,
                describe: built.describe,
                kind: built.kind,
                secrets: built.secrets,
                cached: None,
                generation: 0,
                built_at: Instant::now(),
                broken: false,
                served: false,
            }),
        });
        if probe {
            // Metadata server (is there one?) or a service account (does the
            // key sign?): get the first token now, bounded.
            if let Err(e) = live.fetch(options.first_token_timeout).await {
                return Err(live.first_token_error(e));
            }
        }
        Ok(TokenProvider { live: Some(live) })
    }

    /// The `authorization` header value ("Bearer TOKEN"), from cache when fresh,
    /// fetched/refreshed before expiry otherwise; None for Anonymous.
    ///
    /// Bounded: returns [`AuthError::Timeout`] after 30 s at most.
    pub async fn authorization(&self) -> Result<Option<MetadataValue<Ascii>>, AuthError> {
        match &self.live {
            None => Ok(None),
            Some(live) => live.fetch(live.options.timeout).await.map(Some),
        }
    }

    /// True for Anonymous.
    pub fn is_anonymous(&self) -> bool {
        self.live.is_none()
    }
}

/// google-cloud-auth is built without its default features, so that the
/// process has one crypto library (ring, as tonic's `tls-ring`) instead of
/// also compiling aws-lc. Its HTTP client (reqwest `rustls-no-provider`) and its
/// service-account signer then use rustls' process-wide default provider, and
/// panic if there is none: install ring's, unless the process chose one.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Err means another thread installed one first: fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Tunables; tests shorten them.
#[derive(Debug, Clone, Copy)]
struct Options {
    timeout: Duration,
    first_token_timeout: Duration,
    rebuild_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            timeout: TOKEN_TIMEOUT,
            first_token_timeout: FIRST_TOKEN_TIMEOUT,
            rebuild_interval: REBUILD_INTERVAL,
        }
    }
}

/// Where the credentials were found: names them in messages and lets them be
/// rebuilt.
#[derive(Debug, Clone)]
enum Origin {
    /// `--key-file PATH`.
    KeyFile(PathBuf),
    /// ADC: the file named by `GOOGLE_APPLICATION_CREDENTIALS`.
    AdcEnv(PathBuf),
    /// ADC: gcloud's well-known file.
    AdcWellKnown(PathBuf),
    /// ADC: the metadata server; `adc_file` is the well-known file that was
    /// looked for first (for the error message).
    Metadata { endpoint: String, adc_file: String },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::KeyFile(p) => write!(f, "key file {}", p.display()),
            Origin::AdcEnv(p) => write!(f, "credentials file {} (from {ADC_ENV})", p.display()),
            Origin::AdcWellKnown(p) => write!(f, "gcloud ADC file {}", p.display()),
            Origin::Metadata { endpoint, .. } => write!(f, "metadata server {endpoint}"),
        }
    }
}

impl Origin {
    fn path(&self) -> Option<&Path> {
        match self {
            Origin::KeyFile(p) | Origin::AdcEnv(p) | Origin::AdcWellKnown(p) => Some(p),
            Origin::Metadata { .. } => None,
        }
    }
}

/// Application Default Credentials, resolved as AIP-4110 says.
fn resolve_adc() -> Result<Origin, AuthError> {
    if let Some(path) = std::env::var_os(ADC_ENV).filter(|p| !p.is_empty()) {
        return Ok(Origin::AdcEnv(PathBuf::from(path)));
    }
    let well_known = adc_well_known_path();
    if let Some(path) = &well_known {
        match std::fs::metadata(path) {
            Ok(_) => return Ok(Origin::AdcWellKnown(path.clone())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(AuthError::Read {
                    origin: Origin::AdcWellKnown(path.clone()).to_string(),
                    error,
                })
            }
        }
    }
    Ok(Origin::Metadata {
        endpoint: metadata_endpoint(),
        adc_file: well_known
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("~/.config/gcloud/{ADC_FILE_NAME} ($HOME is not set)")),
    })
}

fn adc_well_known_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(CLOUDSDK_CONFIG_ENV).filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join(ADC_FILE_NAME));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| {
            PathBuf::from(home)
                .join(".config/gcloud")
                .join(ADC_FILE_NAME)
        })
}

/// The metadata server URL google-cloud-auth will use (same rule as its
/// `mds::client::Client::resolve_endpoint`).
fn metadata_endpoint() -> String {
    match std::env::var(METADATA_HOST_ENV) {
        Ok(host) => format!("http://{host}"),
        Err(_) => format!("http://{DEFAULT_METADATA_HOST}"),
    }
}

/// Freshly built credentials.
struct Built {
    creds: Credentials,
    /// e.g. `key file /k.json (service_account)`.
    describe: String,
    kind: &'static str,
    /// Secret strings of the file, redacted from every message.
    secrets: Arc<[String]>,
    /// Get the first token in `new`.
    probe: bool,
}

fn build(origin: &Origin) -> Result<Built, AuthError> {
    let Some(path) = origin.path() else {
        let creds = mds::Builder::default()
            .with_scopes(SCOPES.iter().copied())
            .build();
        let creds = creds.map_err(|e| AuthError::Invalid {
            origin: origin.to_string(),
            kind: "metadata server".into(),
            detail: error_chain(&e, &[]),
        })?;
        return Ok(Built {
            creds,
            describe: origin.to_string(),
            kind: "metadata server",
            secrets: Arc::from(Vec::new()),
            probe: true,
        });
    };
    let text = std::fs::read_to_string(path).map_err(|error| AuthError::Read {
        origin: origin.to_string(),
        error,
    })?;
    let json: Value = serde_json::from_str(&text).map_err(|e| AuthError::Malformed {
        origin: origin.to_string(),
        // Syntax errors only (line, column, what was expected): never content.
        detail: format!("invalid JSON: {e}"),
    })?;
    drop(text);
    let mut secrets = Vec::new();
    collect_secrets(&json, &mut secrets);
    let secrets: Arc<[String]> = Arc::from(secrets);
    let kind = match json.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        Some(_) => {
            return Err(AuthError::Malformed {
                origin: origin.to_string(),
                detail: "the \"type\" field is not a string".into(),
            })
        }
        None => {
            return Err(AuthError::Malformed {
                origin: origin.to_string(),
                detail: if json.is_object() {
                    "no \"type\" field".into()
                } else {
                    "not a JSON object".into()
                },
            })
        }
    };
    let scopes = || SCOPES.iter().copied();
    let (kind, built): (&'static str, _) = match kind.as_str() {
        "service_account" => (
            "service_account",
            service_account::Builder::new(json)
                .with_access_specifier(service_account::AccessSpecifier::from_scopes(scopes()))
                .build(),
        ),
        "authorized_user" => (
            "authorized_user",
            user_account::Builder::new(json)
                .with_scopes(scopes())
                .build(),
        ),
        "external_account" => (
            "external_account",
            external_account::Builder::new(json)
                .with_scopes(scopes())
                .build(),
        ),
        "impersonated_service_account" => (
            "impersonated_service_account",
            impersonated::Builder::new(json)
                .with_scopes(scopes())
                .build(),
        ),
        _ => {
            return Err(AuthError::UnsupportedType {
                origin: origin.to_string(),
                kind: redact(kind, &secrets),
            })
        }
    };
    let creds = built.map_err(|e| AuthError::Invalid {
        origin: origin.to_string(),
        kind: kind.into(),
        detail: error_chain(&e, &secrets),
    })?;
    Ok(Built {
        creds,
        describe: format!("{origin} ({kind})"),
        kind,
        secrets,
        // Local signing: proves the private key now, costs no network.
        probe: kind == "service_account",
    })
}

/// The string values of secret keys, anywhere in the file.
fn collect_secrets(json: &Value, out: &mut Vec<String>) {
    match json {
        Value::Object(map) => {
            for (k, v) in map {
                match v {
                    Value::String(s) if SECRET_KEYS.contains(&k.as_str()) && !s.is_empty() => {
                        out.push(s.clone());
                        // A PEM key may be quoted line by line.
                        out.extend(
                            s.lines()
                                .map(str::trim)
                                .filter(|l| l.len() >= 16 && !l.starts_with("-----"))
                                .map(str::to_owned),
                        );
                    }
                    _ => collect_secrets(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_secrets(v, out)),
        _ => {}
    }
}

fn redact(mut msg: String, secrets: &[String]) -> String {
    // Real secrets are long; a short one (a test's "x") would shred the text.
    for s in secrets.iter().filter(|s| s.len() >= 8) {
        if msg.contains(s.as_str()) {
            msg = msg.replace(s.as_str(), "[redacted]");
        }
    }
    msg
}

/// An error and its sources, one line, without the crate's boilerplate, secrets
/// redacted.
fn error_chain(e: &(dyn std::error::Error + 'static), secrets: &[String]) -> String {
    let mut msg = String::new();
    let mut next = Some(e);
    while let Some(err) = next {
        let part = err.to_string();
        let part = clean_part(&part);
        if !part.is_empty() && !msg.contains(part.as_str()) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&part);
        }
        next = err.source();
    }
    if msg.is_empty() {
        msg = e.to_string();
    }
    redact(msg, secrets)
}

/// Drops the phrases google-cloud-auth and google-cloud-gax wrap around every
/// message (retry verdicts, which [`AuthError::Token`] carries as a flag).
fn clean_part(part: &str) -> String {
    const NOISE: &[&str] = &[
        " but future attempts may succeed",
        " and future attempts will not succeed",
        "Fetching the token resulted in transient errors. Subsequent calls with this credential \
         might succeed.",
        "cannot create the authentication headers ",
        "the transport reports an error: ",
        "Request to fetch the token failed. Subsequent calls with this credential will also \
         fail.",
    ];
    let mut part = part.to_string();
    for noise in NOISE {
        part = part.replace(noise, "");
    }
    part.trim().to_string()
}

struct Live {
    origin: Origin,
    options: Options,
    state: Mutex<State>,
}

struct State {
    creds: Credentials,
    describe: String,
    kind: &'static str,
    secrets: Arc<[String]>,
    /// The last header value and the crate's tag for it.
    cached: Option<(EntityTag, MetadataValue<Ascii>)>,
    /// Bumped by every rebuild, so a late answer from old credentials is not
    /// cached over new ones.
    generation: u64,
    built_at: Instant,
    /// A permanent failure or a timeout: rebuild on a later call.
    broken: bool,
    /// A token was handed out once. Failures before that are only returned
    /// (the caller reports them: a mount that cannot start says so in its one
    /// error line); failures after it are also logged as warnings.
    served: bool,
}

/// What one fetch saw, before it is turned into an [`AuthError`].
enum FetchError {
    Token {
        detail: String,
        transient: bool,
    },
    Timeout(Duration),
    /// Rebuilding the credentials from their source failed.
    Rebuild(AuthError),
}

impl Live {
    fn lock(&self) -> MutexGuard<'_, State> {
        crate::sync::lock(&self.state)
    }

    async fn fetch(&self, timeout: Duration) -> Result<MetadataValue<Ascii>, AuthError> {
        self.try_fetch(timeout).await.map_err(|e| match e {
            FetchError::Token { detail, transient } => AuthError::Token {
                origin: self.origin.to_string(),
                detail,
                transient,
            },
            FetchError::Timeout(after) => AuthError::Timeout {
                origin: self.origin.to_string(),
                after,
            },
            FetchError::Rebuild(e) => e,
        })
    }

    async fn try_fetch(&self, timeout: Duration) -> Result<MetadataValue<Ascii>, FetchError> {
        let (creds, cached, generation, secrets) = {
            let mut st = self.lock();
            if st.broken && st.built_at.elapsed() >= self.options.rebuild_interval {
                self.rebuild(&mut st).map_err(FetchError::Rebuild)?;
            }
            (
                st.creds.clone(),
                st.cached.clone(),
                st.generation,
                st.secrets.clone(),
            )
        };
        let mut extensions = http::Extensions::new();
        if let Some((tag, _)) = &cached {
            extensions.insert(tag.clone());
        }
        // The crate panics if its refresh task is gone (the runtime that built
        // the credentials was shut down, or the task itself panicked): turn that
        // into an error and rebuild, rather than take the caller down.
        let call = AssertUnwindSafe(creds.headers(extensions)).catch_unwind();
        let answer = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_panic)) => {
                tracing::warn!(source = %self.origin, "credentials: the refresh task is gone");
                self.mark_broken(generation);
                return Err(FetchError::Token {
                    detail: "the credentials' refresh task is gone (its tokio runtime shut \
                             down?); they will be rebuilt"
                        .into(),
                    transient: true,
                });
            }
            Err(_) => {
                tracing::warn!(source = %self.origin, ?timeout, "credentials: token request timed out");
                self.mark_broken(generation);
                return Err(FetchError::Timeout(timeout));
            }
        };
        match answer {
            Ok(CacheableResource::NotModified) => match cached {
                Some((_, value)) => Ok(value),
                // Not reachable: the crate answers NotModified only to a tag.
                None => Err(FetchError::Token {
                    detail: "the credentials answered \"not modified\" to a first request".into(),
                    transient: true,
                }),
            },
            Ok(CacheableResource::New { entity_tag, data }) => {
                let value = header_value(&data)?;
                let mut st = self.lock();
                if st.generation == generation {
                    st.cached = Some((entity_tag, value.clone()));
                }
                st.served = true;
                tracing::debug!(source = %st.describe, "credentials: new access token");
                Ok(value)
            }
            Err(e) => Err(self.failed(&e, generation, &secrets)),
        }
    }

    fn failed(&self, e: &CredentialsError, generation: u64, secrets: &[String]) -> FetchError {
        let transient = e.is_transient();
        let detail = error_chain(e, secrets);
        if transient {
            tracing::debug!(source = %self.origin, error = %detail, "credentials: transient failure");
        } else {
            if self.lock().served {
                tracing::warn!(source = %self.origin, error = %detail, "credentials: permanent failure");
            } else {
                tracing::debug!(source = %self.origin, error = %detail, "credentials: permanent failure");
            }
            self.mark_broken(generation);
        }
        FetchError::Token { detail, transient }
    }

    fn mark_broken(&self, generation: u64) {
        let mut st = self.lock();
        if st.generation == generation {
            st.broken = true;
        }
    }

    fn rebuild(&self, st: &mut State) -> Result<(), AuthError> {
        st.built_at = Instant::now();
        let built = build(&self.origin)?;
        tracing::debug!(source = %built.describe, "credentials: rebuilt after a failure");
        st.creds = built.creds;
        st.describe = built.describe;
        st.kind = built.kind;
        st.secrets = built.secrets;
        st.cached = None;
        st.generation += 1;
        st.broken = false;
        Ok(())
    }

    /// The error of `new` when the first token fails.
    fn first_token_error(&self, e: AuthError) -> AuthError {
        let detail = match &e {
            AuthError::Token { detail, .. } => detail.clone(),
            AuthError::Timeout { after, .. } => format!("no answer in {} s", after.as_secs()),
            _ => return e,
        };
        match &self.origin {
            Origin::Metadata { endpoint, adc_file } => AuthError::NoAdc {
                adc_file: adc_file.clone(),
                metadata: endpoint.clone(),
                detail,
            },
            origin => AuthError::Invalid {
                origin: origin.to_string(),
                kind: self.lock().kind.into(),
                detail,
            },
        }
    }
}

/// The `authorization` header of the crate's answer, as gRPC metadata.
fn header_value(headers: &http::HeaderMap) -> Result<MetadataValue<Ascii>, FetchError> {
    let bad = |detail: &str| FetchError::Token {
        detail: detail.into(),
        transient: false,
    };
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| bad("the credentials produced no authorization header"))?;
    let mut value = MetadataValue::<Ascii>::try_from(value.as_bytes())
        .map_err(|_| bad("the access token is not a valid header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn scopes_are_read_only() {
        assert_eq!(
            SCOPES,
            &["https://www.googleapis.com/auth/devstorage.read_only"]
        );
    }

    #[test]
    fn secrets_are_collected_and_redacted() {
        let json = serde_json::json!({
            "type": "authorized_user",
            "client_id": "public-client-id",
            "client_secret": "s3cr3t-client-secret",
            "refresh_token": "1//refresh-token-value",
            "nested": {"private_key": "-----BEGIN PRIVATE KEY-----\nAAAABBBBCCCCDDDDEEEEFFFF\n-----END PRIVATE KEY-----\n"},
        });
        let mut secrets = Vec::new();
        collect_secrets(&json, &mut secrets);
        let msg = "a s3cr3t-client-secret b 1//refresh-token-value c AAAABBBBCCCCDDDDEEEEFFFF d public-client-id".to_string();
        let out = redact(msg, &secrets);
        assert_eq!(
            out,
            "a [redacted] b [redacted] c [redacted] d public-client-id"
        );
    }

    #[test]
    fn origins_name_their_source() {
        let o = Origin::KeyFile("/k/key.json".into());
        assert_eq!(o.to_string(), "key file /k/key.json");
        let o = Origin::AdcEnv("/k/a.json".into());
        assert_eq!(
            o.to_string(),
            "credentials file /k/a.json (from GOOGLE_APPLICATION_CREDENTIALS)"
        );
        let o = Origin::Metadata {
            endpoint: "http://metadata.google.internal".into(),
            adc_file: "/h/.config/gcloud/application_default_credentials.json".into(),
        };
        assert_eq!(
            o.to_string(),
            "metadata server http://metadata.google.internal"
        );
    }

    /// A loopback token endpoint. `script` gives, per request number (from 1),
    /// `Some(status)` to answer with, or `None` to never answer.
    async fn token_server(
        script: fn(usize) -> Option<u16>,
    ) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Read the head and a body of Content-Length bytes.
                    loop {
                        let n = match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buf).to_string();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let len = text[..end]
                                .lines()
                                .find_map(|l| {
                                    let (k, v) = l.split_once(':')?;
                                    k.eq_ignore_ascii_case("content-length")
                                        .then(|| v.trim().parse::<usize>().ok())?
                                })
                                .unwrap_or(0);
                            if buf.len() >= end + 4 + len {
                                break;
                            }
                        }
                    }
                    let n = seen.fetch_add(1, Ordering::SeqCst) + 1;
                    let Some(status) = script(n) else {
                        // Hang: hold the connection open without answering.
                        std::future::pending::<()>().await;
                        return;
                    };
                    let body = if status == 200 {
                        format!(
                            r#"{{"access_token":"unit-token-{n}","expires_in":3600,"token_type":"Bearer"}}"#
                        )
                    } else {
                        r#"{"error":"invalid_grant"}"#.to_string()
                    };
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        (url, count, task)
    }

    fn user_file(dir: &Path, token_uri: &str) -> PathBuf {
        let path = dir.join("user.json");
        let json = serde_json::json!({
            "type": "authorized_user",
            "client_id": "unit-client-id",
            "client_secret": "unit-client-secret",
            "refresh_token": "unit-refresh-token",
            "token_uri": token_uri,
        });
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    #[tokio::test]
    async fn hanging_token_server_times_out() {
        let (url, count, _server) = token_server(|_| None).await;
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            timeout: Duration::from_millis(300),
            ..Options::default()
        };
        let path = user_file(dir.path(), &url);
        let tp = TokenProvider::with_options(CredentialsSource::KeyFile(path.clone()), options)
            .await
            .unwrap();
        let started = Instant::now();
        let err = tp.authorization().await.unwrap_err();
        assert!(matches!(err, AuthError::Timeout { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn permanent_failure_rebuilds_the_credentials() {
        // First request: 401; then 200.
        let (url, count, _server) = token_server(|n| Some(if n == 1 { 401 } else { 200 })).await;
        let dir = tempfile::tempdir().unwrap();
        let path = user_file(dir.path(), &url);
        let options = Options {
            rebuild_interval: Duration::ZERO,
            ..Options::default()
        };
        let tp = TokenProvider::with_options(CredentialsSource::KeyFile(path), options)
            .await
            .unwrap();
        let err = tp.authorization().await.unwrap_err();
        assert!(
            matches!(
                err,
                AuthError::Token {
                    transient: false,
                    ..
                }
            ),
            "{err:?}"
        );
        // The crate's credentials are dead now; ours are rebuilt (the file
        // re-read) on this call and fetch a new token.
        let value = tp.authorization().await.unwrap().unwrap();
        assert_eq!(value.to_str().unwrap(), "Bearer unit-token-2");
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // And cached again.
        let again = tp.authorization().await.unwrap().unwrap();
        assert_eq!(again, value);
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    /// Built on a runtime that is then shut down (its refresh task dies with
    /// it), used from another: an error, not a panic, then rebuilt and working.
    #[test]
    fn credentials_outlive_the_runtime_that_built_them() {
        let serving = tokio::runtime::Runtime::new().unwrap();
        let (url, count, _server) = serving.block_on(token_server(|_| Some(200)));
        let dir = tempfile::tempdir().unwrap();
        let path = user_file(dir.path(), &url);
        let options = Options {
            rebuild_interval: Duration::ZERO,
            ..Options::default()
        };
        let building = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let tp = building
            .block_on(TokenProvider::with_options(
                CredentialsSource::KeyFile(path),
                options,
            ))
            .unwrap();
        drop(building);
        serving.block_on(async {
            let err = tp.authorization().await.unwrap_err();
            assert!(err.to_string().contains("refresh task is gone"), "{err}");
            assert!(err.is_transient());
            let value = tp.authorization().await.unwrap().unwrap();
            assert!(value.to_str().unwrap().starts_with("Bearer unit-token-"));
        });
        assert!(count.load(Ordering::SeqCst) >= 1);
    }

    #[tokio::test]
    async fn permanent_failure_is_not_retried_before_the_interval() {
        let (url, count, _server) = token_server(|n| Some(if n == 1 { 401 } else { 200 })).await;
        let dir = tempfile::tempdir().unwrap();
        let path = user_file(dir.path(), &url);
        let tp = TokenProvider::new(CredentialsSource::KeyFile(path))
            .await
            .unwrap();
        for _ in 0..3 {
            let err = tp.authorization().await.unwrap_err();
            assert!(
                matches!(
                    err,
                    AuthError::Token {
                        transient: false,
                        ..
                    }
                ),
                "{err:?}"
            );
        }
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}
