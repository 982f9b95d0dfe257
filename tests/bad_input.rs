//! Bad input to the real `zonalfs` binary, one table row per case (docs/errors.md
//! lists the same cases): every failure exits non-zero (2 for a bad command
//! line or config file, 1 for what fails later), prints exactly one stderr line
//! `zonalfs: error: MESSAGE` (no log lines, no panic, no backtrace, no clap
//! usage block) naming the problem, and leaves nothing mounted. Also names a
//! bucket may really hold that are odd but valid (spaces, backslashes, `%`,
//! combining characters, emoji, right-to-left text) and a 200-level path, read
//! through a real mount.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use common::mount::{is_mounted, zonalfs_cmd, Daemon, MountGuard};
use common::*;

const TOKEN: &str = "emulator-test-token";

/// Runs `zonalfs ARGS` with no ambient endpoint or credentials: no gcloud
/// configuration under `home`, and the metadata server at `metadata` (a closed
/// port), so Application Default Credentials find nothing.
fn run_isolated(args: &[String], home: &Path, metadata: &str) -> Output {
    zonalfs_cmd()
        .args(args)
        .env("HOME", home)
        .env("GCE_METADATA_HOST", metadata)
        .env_remove("CLOUDSDK_CONFIG")
        .env_remove("STORAGE_EMULATOR_HOST")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("ZONALFS_CONFIG")
        .env_remove("ZONALFS_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(bounded)
        .expect("run zonalfs")
}

/// Runs `zonalfs ARGS` with no ambient endpoint or credentials.
fn run(args: &[String]) -> Output {
    zonalfs_cmd()
        .args(args)
        .env_remove("STORAGE_EMULATOR_HOST")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("ZONALFS_CONFIG")
        .env_remove("ZONALFS_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(bounded)
        .expect("run zonalfs")
}

/// The output of `child`, which must exit within two minutes: a case that
/// unexpectedly mounts in the foreground is killed (and fails its row)
/// instead of hanging the suite.
fn bounded(mut child: std::process::Child) -> Output {
    let exited = wait_until(std::time::Duration::from_secs(120), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    child.wait_with_output().expect("zonalfs output")
}

/// The one-line error contract: stderr (trimmed) is exactly one line, it
/// starts with `zonalfs: error: `, carries no panic, backtrace or ANSI colour,
/// and has something after the prefix. Returns the message, or what breaks
/// the contract.
fn one_line_error(out: &Output) -> Result<String, String> {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if err.lines().count() != 1 {
        return Err(format!("not one line: {err:?}"));
    }
    let msg = err
        .strip_prefix("zonalfs: error: ")
        .ok_or_else(|| format!("not a 'zonalfs: error:' line: {err:?}"))?;
    if msg.trim().is_empty() {
        return Err("empty message".into());
    }
    for bad in ["panicked", "backtrace", "RUST_BACKTRACE", "\x1b[", "Usage:"] {
        if err.contains(bad) {
            return Err(format!("{bad:?} in {err:?}"));
        }
    }
    Ok(msg.to_string())
}

fn fixture_key() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/test-service-account.json")
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// One case: arguments (with `{MNT}`, `{EP}`, `{AUTH_EP}`, `{DIR}`, `{KEY}`,
/// `{CLOSED}` filled in), the exit code, and text the message must contain.
struct Case {
    name: &'static str,
    args: &'static str,
    code: i32,
    needles: &'static [&'static str],
}

const CASES: &[Case] = &[
    // The command line (exit 2).
    Case {
        name: "unknown flag",
        args: "mount test-bucket {MNT} --no-such-flag",
        code: 2,
        needles: &["unexpected argument '--no-such-flag'", "zonalfs mount --help"],
    },
    Case {
        name: "misspelt flag",
        args: "mount test-bucket {MNT} --forc",
        code: 2,
        needles: &["'--forc'", "similar argument exists: '--force'"],
    },
    Case {
        name: "unknown subcommand",
        args: "mont test-bucket {MNT}",
        code: 2,
        needles: &["unrecognized subcommand 'mont'"],
    },
    Case {
        name: "no bucket, no mountpoint",
        args: "mount",
        code: 2,
        needles: &["required arguments were not provided: <BUCKET>, <MOUNTPOINT>"],
    },
    Case {
        name: "no mountpoint",
        args: "mount test-bucket",
        code: 2,
        needles: &["required arguments were not provided: <MOUNTPOINT>"],
    },
    Case {
        name: "gs:// URL as the bucket",
        args: "mount gs://test-bucket {MNT}",
        code: 2,
        needles: &["not a bucket name", "'test-bucket'"],
    },
    Case {
        name: "invalid bucket name",
        args: "mount Bad_Bucket! {MNT}",
        code: 2,
        needles: &["'Bad_Bucket!' is not a valid bucket name"],
    },
    Case {
        name: "bad number",
        args: "mount test-bucket {MNT} --uid abc",
        code: 2,
        needles: &["invalid value 'abc' for '--uid <UID>'"],
    },
    Case {
        name: "bad mode",
        args: "mount test-bucket {MNT} --file-mode 0999",
        code: 2,
        needles: &["'0999' is not an octal mode"],
    },
    Case {
        name: "bad size",
        args: "mount test-bucket {MNT} --memory-limit 12Q",
        code: 2,
        needles: &["--memory-limit", "unknown unit 'Q'"],
    },
    Case {
        name: "no network threads",
        args: "mount test-bucket {MNT} --network-threads 0",
        code: 2,
        needles: &["--network-threads", "'0' is not a thread count"],
    },
    Case {
        name: "bad duration",
        args: "mount test-bucket {MNT} --retry-deadline 5y",
        code: 2,
        needles: &["--retry-deadline", "unknown unit 'y'"],
    },
    Case {
        name: "number out of range",
        args: "mount test-bucket {MNT} --connections 0",
        code: 2,
        needles: &["--connections", "0 is not in 1..=64"],
    },
    Case {
        name: "unknown -o option",
        args: "mount test-bucket {MNT} -o bogus_opt",
        code: 2,
        needles: &["'--bogus-opt'"],
    },
    Case {
        name: "--key-file with --anonymous",
        args: "mount test-bucket {MNT} --anonymous --key-file {KEY}",
        code: 2,
        needles: &["cannot be used with"],
    },
    Case {
        name: "bad log level",
        args: "mount test-bucket {MNT} --log-level verbose",
        code: 2,
        needles: &["'verbose' is not a log level"],
    },
    Case {
        name: "unwritable log file",
        args: "mount -f test-bucket {MNT} --endpoint {EP} --anonymous --log-file /nonexistent/zonalfs.log",
        code: 2,
        needles: &["--log-file /nonexistent/zonalfs.log: No such file"],
    },
    // The config file (exit 2).
    Case {
        name: "config file missing",
        args: "mount test-bucket {MNT} --config {DIR}/missing.toml",
        code: 2,
        needles: &["config file {DIR}/missing.toml: No such file"],
    },
    Case {
        name: "config file malformed",
        args: "mount test-bucket {MNT} --config {DIR}/malformed.toml",
        code: 2,
        needles: &["config file {DIR}/malformed.toml: line 2:"],
    },
    Case {
        name: "config file unknown key",
        args: "mount test-bucket {MNT} --config {DIR}/unknown.toml",
        code: 2,
        needles: &["config file {DIR}/unknown.toml: unknown key 'colour'"],
    },
    Case {
        name: "config file bad value",
        args: "mount test-bucket {MNT} --config {DIR}/badvalue.toml",
        code: 2,
        needles: &["config file {DIR}/badvalue.toml: 'file_mode'", "not an octal mode"],
    },
    Case {
        name: "config file with conflicting keys",
        args: "mount test-bucket {MNT} --config {DIR}/conflict.toml",
        code: 2,
        needles: &["'--key-file <KEY_FILE>' cannot be used with '--anonymous'"],
    },
    Case {
        name: "config file wrong type",
        args: "mount test-bucket {MNT} --config {DIR}/badtype.toml",
        code: 2,
        needles: &["'uid' must be a string, number or boolean, not array"],
    },
    // The mountpoint (exit 1). Already mounted and stale mounts: see
    // tests/mount.rs and `odd_and_deep_names_through_a_real_mount` below.
    Case {
        name: "mountpoint missing",
        args: "mount -f test-bucket {DIR}/no-such-dir --endpoint {EP} --anonymous",
        code: 1,
        needles: &["mountpoint {DIR}/no-such-dir: No such file or directory"],
    },
    Case {
        name: "mountpoint not a directory",
        args: "mount -f test-bucket {DIR}/malformed.toml --endpoint {EP} --anonymous",
        code: 1,
        needles: &["mountpoint {DIR}/malformed.toml: not a directory"],
    },
    Case {
        name: "mountpoint not empty",
        args: "mount -f test-bucket {DIR} --endpoint {EP} --anonymous",
        code: 1,
        needles: &["mountpoint {DIR}: not empty"],
    },
    Case {
        name: "--temp-dir missing",
        args: "mount -f test-bucket {MNT} --endpoint {EP} --anonymous --temp-dir {DIR}/no-such-dir",
        code: 1,
        needles: &["--temp-dir {DIR}/no-such-dir: No such file or directory"],
    },
    Case {
        name: "--temp-dir not a directory",
        args: "mount -f test-bucket {MNT} --endpoint {EP} --anonymous --temp-dir {DIR}/malformed.toml",
        code: 1,
        needles: &["--temp-dir {DIR}/malformed.toml: not a directory"],
    },
    // Endpoint, TLS, credentials, bucket (exit 1).
    Case {
        name: "no credentials at all",
        args: "mount -f test-bucket {MNT} --endpoint {EP}",
        code: 1,
        needles: &["no Application Default Credentials", "--key-file"],
    },
    Case {
        name: "bucket not found",
        args: "mount -f no-such-bucket {MNT} --endpoint {EP} --anonymous",
        code: 1,
        needles: &["bucket \"no-such-bucket\" not found"],
    },
    Case {
        name: "bucket not found (daemon)",
        args: "mount no-such-bucket {MNT} --endpoint {EP} --anonymous",
        code: 1,
        needles: &["bucket \"no-such-bucket\" not found"],
    },
    Case {
        name: "unauthenticated",
        args: "mount -f test-bucket {MNT} --endpoint {AUTH_EP} --anonymous",
        code: 1,
        needles: &["not authenticated for bucket \"test-bucket\"", "--key-file"],
    },
    Case {
        name: "permission denied",
        args: "mount -f test-bucket {MNT} --endpoint {AUTH_EP} --key-file {KEY}",
        code: 1,
        needles: &["permission denied for bucket \"test-bucket\""],
    },
    Case {
        name: "permission denied (daemon)",
        args: "mount test-bucket {MNT} --endpoint {AUTH_EP} --key-file {KEY}",
        code: 1,
        needles: &["permission denied for bucket \"test-bucket\""],
    },
    Case {
        name: "endpoint unreachable",
        args: "mount -f test-bucket {MNT} --endpoint http://127.0.0.1:{CLOSED} --anonymous",
        code: 1,
        needles: &["cannot connect to http://127.0.0.1:{CLOSED}: connection refused"],
    },
    Case {
        name: "endpoint without a scheme",
        args: "mount -f test-bucket {MNT} --endpoint 127.0.0.1:{CLOSED} --anonymous",
        code: 1,
        needles: &["endpoint '127.0.0.1:{CLOSED}' must start with https://"],
    },
    Case {
        name: "https to a plaintext server",
        args: "mount -f test-bucket {MNT} --endpoint {TLS_TO_PLAIN} --anonymous",
        code: 1,
        needles: &["cannot connect to {TLS_TO_PLAIN}: TLS handshake failed"],
    },
    Case {
        name: "key file missing",
        args: "mount -f test-bucket {MNT} --endpoint {EP} --key-file {DIR}/missing.json",
        code: 1,
        needles: &["cannot read key file {DIR}/missing.json: No such file"],
    },
    Case {
        name: "key file unreadable",
        args: "mount -f test-bucket {MNT} --endpoint {EP} --key-file {DIR}",
        code: 1,
        needles: &["cannot read key file {DIR}:"],
    },
    Case {
        name: "key file not JSON",
        args: "mount -f test-bucket {MNT} --endpoint {EP} --key-file {DIR}/malformed.toml",
        code: 1,
        needles: &["key file {DIR}/malformed.toml is not a valid credentials file"],
    },
    Case {
        name: "key file bad private key",
        args: "mount -f test-bucket {MNT} --endpoint {EP} --key-file {DIR}/badkey.json",
        code: 1,
        needles: &["key file {DIR}/badkey.json holds unusable service_account credentials"],
    },
    Case {
        name: "unmount of a plain directory",
        args: "unmount {MNT}",
        code: 1,
        needles: &["unmount {MNT}: not a mount point"],
    },
    Case {
        name: "tool: object not found",
        args: "stat gs://test-bucket/missing --endpoint {EP} --anonymous",
        code: 1,
        needles: &["gs://test-bucket/missing"],
    },
];

#[test]
fn bad_input_is_one_line_nonzero_and_mounts_nothing() {
    let tree = Tree::new();
    tree.put("x", b"x");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let auth_emu = EmuChild::spawn(tree.root(), &["--require-token", TOKEN]);
    let files = tempfile::tempdir().expect("dir");
    let dir = files.path().to_str().expect("utf-8").to_string();
    std::fs::write(files.path().join("malformed.toml"), "a = 1\nuid = [1\n").expect("w");
    std::fs::write(files.path().join("unknown.toml"), "colour = \"blue\"\n").expect("w");
    std::fs::write(
        files.path().join("badvalue.toml"),
        "file_mode = \"rw-r--r--\"\n",
    )
    .expect("w");
    std::fs::write(files.path().join("badtype.toml"), "uid = [1]\n").expect("w");
    std::fs::write(
        files.path().join("conflict.toml"),
        "key_file = \"/k.json\"\nanonymous = true\n",
    )
    .expect("w");
    let mut key: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_key()).expect("fixture")).expect("json");
    key["private_key"] = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into();
    std::fs::write(files.path().join("badkey.json"), key.to_string()).expect("w");

    let closed = closed_port().to_string();
    let ep = format!("http://{}", emu.addr);
    let tls_to_plain = format!("https://{}", emu.addr);
    let auth_ep = format!("http://{}", auth_emu.addr);
    let key = fixture_key().to_str().expect("utf-8").to_string();
    // Every row runs; each failing one is reported with all that was wrong.
    let mut failures = Vec::new();
    for case in CASES {
        let mnt = tempfile::tempdir().expect("mountpoint");
        let fill = |s: &str| {
            s.replace("{MNT}", mnt.path().to_str().expect("utf-8"))
                .replace("{DIR}", &dir)
                .replace("{AUTH_EP}", &auth_ep)
                .replace("{EP}", &ep)
                .replace("{TLS_TO_PLAIN}", &tls_to_plain)
                .replace("{KEY}", &key)
                .replace("{CLOSED}", &closed)
        };
        let args: Vec<String> = fill(case.args).split(' ').map(str::to_string).collect();
        let out = run_isolated(&args, files.path(), &format!("127.0.0.1:{closed}"));
        let mut wrong = Vec::new();
        if out.status.code() != Some(case.code) {
            wrong.push(format!(
                "exit {:?}, not {}: {}",
                out.status.code(),
                case.code,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        match one_line_error(&out) {
            Ok(msg) => {
                for n in case.needles {
                    let n = fill(n);
                    if !msg.contains(&n) {
                        wrong.push(format!("{n:?} not in {msg:?}"));
                    }
                }
            }
            Err(e) => wrong.push(e),
        }
        if !out.stdout.is_empty() {
            wrong.push(format!("stdout {:?}", out.stdout));
        }
        for p in [mnt.path(), files.path()] {
            if is_mounted(p) {
                wrong.push(format!("{} is mounted", p.display()));
                // Detached (its daemon, if any, killed), so that the next
                // rows start clean.
                drop(Daemon::of(p));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}", case.name, wrong.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

/// `zonalfs` alone and `--help` print help (not an error); `--version` the
/// version: both exit as clap does, without an error line.
#[test]
fn help_and_version_are_not_errors() {
    let out = run(&["mount".into(), "--help".into()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: zonalfs mount"));
    let out = run(&["--version".into()]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("zonalfs "));
}

/// Names a bucket may hold that are valid but unusual, and a 200-level path:
/// listed and read exactly through a real mount. A second mount at the same
/// place is refused with one line and leaves the first one serving.
#[test]
fn odd_and_deep_names_through_a_real_mount() {
    let tree = Tree::new();
    let odd = [
        "with space",
        " leading and trailing ",
        "back\\slash",
        "per%25cent%",
        "e\u{301}combining",
        "emoji-\u{1F600}",
        "rtl-\u{5D0}\u{5D1}\u{5D2}",
        "tab\there",
        "quote\"'",
        "*?[glob]",
        "-dash",
    ];
    for (i, n) in odd.iter().enumerate() {
        tree.put(n, format!("odd {i}").as_bytes());
    }
    let deep: String = (0..200).map(|i| format!("d{i}/")).collect::<String>() + "leaf";
    tree.put(&deep, b"deep");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let ep = format!("http://{}", emu.addr);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let m = MountGuard::mount(&ep, mnt.path(), &[]);

    let mut names: Vec<String> = std::fs::read_dir(mnt.path())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    let mut want: Vec<String> = odd.iter().map(|s| s.to_string()).collect();
    want.push("d0".into());
    want.sort();
    assert_eq!(names, want);
    for (i, n) in odd.iter().enumerate() {
        assert_eq!(
            std::fs::read(mnt.path().join(n)).expect(n),
            format!("odd {i}").as_bytes(),
            "{n:?}"
        );
    }
    let deep_path = mnt.path().join(&deep);
    assert_eq!(std::fs::read(&deep_path).expect("deep read"), b"deep");
    let mut walked = 0;
    let mut d = mnt.path().to_path_buf();
    while let Some(e) = std::fs::read_dir(&d)
        .expect("readdir deep")
        .map(|e| e.expect("entry"))
        .find(|e| e.file_type().expect("type").is_dir())
    {
        d = e.path();
        walked += 1;
    }
    assert_eq!(walked, 200, "levels reached by readdir");

    // Already mounted: one line, and the first mount keeps serving.
    let out = run(&[
        "mount".into(),
        "-f".into(),
        BUCKET.into(),
        mnt.path().to_str().expect("utf-8").into(),
        "--endpoint".into(),
        ep.clone(),
        "--anonymous".into(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let msg = one_line_error(&out).unwrap_or_else(|e| panic!("already mounted: {e}"));
    assert!(msg.contains("is already a mount point"), "{msg}");
    assert_eq!(
        std::fs::read(mnt.path().join("-dash")).expect("read"),
        b"odd 10"
    );
    drop(m);
    assert!(!is_mounted(mnt.path()));
}
