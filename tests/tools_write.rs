//! `zonalfs cp`, `append`, `rm` and `mv` as a user runs them, against the
//! emulator binary (with write faults): what they write is the source byte for
//! byte, appendable or finalized as asked; `append -` persists standard input
//! as it comes (a `tail -f` pipe); bad input is one line and exit 1, usage 2.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};

fn zonalfs(args: &[&str], host: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zonalfs"))
        .args(args)
        .env("STORAGE_EMULATOR_HOST", host)
        .output()
        .expect("run zonalfs")
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "failed ({}): {err}", out.status);
    err
}

/// `zonalfs stat` as key → value.
fn stat(host: &str, url: &str) -> std::collections::HashMap<String, String> {
    let out = zonalfs(&["stat", url], host);
    ok(&out);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn sha(b: &[u8]) -> Vec<u8> {
    Sha256::digest(b).to_vec()
}

#[test]
fn cp_append_mv_rm_round_trip() {
    let tree = Tree::new();
    let emu = EmuChild::spawn(tree.root(), &[]);
    let host = emu.addr.as_str();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("data.bin");
    let body = pattern(21 * (1 << 20) + 77, 4);
    std::fs::write(&src, &body).unwrap();
    let src_s = src.to_str().unwrap();

    // Upload into a prefix: the object takes the file's name; finalized.
    let msg = ok(&zonalfs(&["cp", src_s, "gs://test-bucket/in/"], host));
    assert!(msg.contains("gs://test-bucket/in/data.bin"), "{msg}");
    let st = stat(host, "gs://test-bucket/in/data.bin");
    assert_eq!(st["size"], body.len().to_string());
    assert_eq!(st["finalized"], "true");
    assert_eq!(st["crc32c"], format!("{:08x}", crc32c::crc32c(&body)));
    assert_eq!(
        sha(&std::fs::read(tree.path("in/data.bin")).unwrap()),
        sha(&body)
    );
    // Stderr is not a terminal here: no progress lines, only the summary.
    assert_eq!(msg.lines().count(), 1, "{msg}");

    // -n refuses to replace it.
    let out = zonalfs(&["cp", "-n", src_s, "gs://test-bucket/in/data.bin"], host);
    assert_eq!(out.status.code(), Some(1));

    // --no-finalize, then appends by takeover, then --finalize.
    ok(&zonalfs(
        &["cp", "--no-finalize", src_s, "gs://test-bucket/log"],
        host,
    ));
    let st = stat(host, "gs://test-bucket/log");
    assert_eq!(st["finalized"], "false");
    let generation = st["generation"].clone();
    ok(&zonalfs(&["append", src_s, "gs://test-bucket/log"], host));
    let mut child = Command::new(env!("CARGO_BIN_EXE_zonalfs"))
        .args(["append", "-", "gs://test-bucket/log", "--finalize"])
        .env("STORAGE_EMULATOR_HOST", host)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn append -");
    let mut stdin = child.stdin.take().expect("stdin");
    let line = b"a line of the log\n";
    stdin.write_all(line).unwrap();
    // A quiet pipe is persisted while the writer keeps it open.
    let want = (2 * body.len() + line.len()).to_string();
    must_wait_until(
        "the piped line is persisted while the pipe stays open",
        Duration::from_secs(20),
        || stat(host, "gs://test-bucket/log")["size"] == want,
    );
    stdin.write_all(line).unwrap();
    drop(stdin);
    let out = child.wait_with_output().expect("append - ends");
    ok(&out);
    let st = stat(host, "gs://test-bucket/log");
    assert_eq!(st["finalized"], "true");
    assert_eq!(st["generation"], generation, "appends keep the generation");
    let whole = [body.as_slice(), body.as_slice(), line, line].concat();
    assert_eq!(st["crc32c"], format!("{:08x}", crc32c::crc32c(&whole)));
    assert_eq!(sha(&std::fs::read(tree.path("log")).unwrap()), sha(&whole));

    // Download.
    let back = work.path().join("back.bin");
    ok(&zonalfs(
        &["cp", "gs://test-bucket/log", back.to_str().unwrap()],
        host,
    ));
    assert_eq!(sha(&std::fs::read(&back).unwrap()), sha(&whole));

    // mv: an object (atomic, same generation), then a folder.
    ok(&zonalfs(
        &["mv", "gs://test-bucket/log", "gs://test-bucket/old/log"],
        host,
    ));
    assert_eq!(
        stat(host, "gs://test-bucket/old/log")["generation"],
        generation
    );
    ok(&zonalfs(
        &["mv", "gs://test-bucket/old/", "gs://test-bucket/archive/"],
        host,
    ));
    assert_eq!(
        sha(&std::fs::read(tree.path("archive/log")).unwrap()),
        sha(&whole)
    );

    // rm.
    ok(&zonalfs(
        &[
            "rm",
            "gs://test-bucket/archive/log",
            "gs://test-bucket/in/data.bin",
        ],
        host,
    ));
    assert!(!tree.path("archive/log").exists() && !tree.path("in/data.bin").exists());
}

/// The same upload and append through every write fault: byte-exact.
#[test]
fn cp_and_append_survive_write_faults() {
    let tree = Tree::new();
    let emu = EmuChild::spawn(
        tree.root(),
        &[
            "--break-after-bytes",
            "5000000",
            "--redirect-every",
            "3",
            "--fail-open-rate",
            "0.2",
            "--seed",
            "9",
        ],
    );
    let host = emu.addr.as_str();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("f");
    let body = pattern(17 * (1 << 20) + 5, 8);
    std::fs::write(&src, &body).unwrap();
    let src_s = src.to_str().unwrap();
    ok(&zonalfs(
        &[
            "cp",
            "--no-finalize",
            "--flush-every",
            "2MiB",
            src_s,
            "gs://test-bucket/f",
        ],
        host,
    ));
    ok(&zonalfs(
        &[
            "append",
            "--finalize",
            "--flush-every",
            "2MiB",
            src_s,
            "gs://test-bucket/f",
        ],
        host,
    ));
    let whole = [body.as_slice(), body.as_slice()].concat();
    assert_eq!(sha(&std::fs::read(tree.path("f")).unwrap()), sha(&whole));
    assert_eq!(stat(host, "gs://test-bucket/f")["finalized"], "true");
}

#[test]
fn bad_input_is_one_line_and_exit_1() {
    let tree = Tree::new();
    tree.put("final", b"done");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let host = emu.addr.as_str();
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("s");
    std::fs::write(&src, b"x").unwrap();
    let src_s = src.to_str().unwrap();
    let missing = work.path().join("missing");
    let cases: Vec<(Vec<&str>, &str, i32)> = vec![
        (
            vec!["cp", missing.to_str().unwrap(), "gs://test-bucket/o"],
            "No such file",
            1,
        ),
        (
            vec!["append", src_s, "gs://test-bucket/final"],
            "finalized",
            1,
        ),
        (
            vec!["cp", src_s, "gs://no-such-bucket/o"],
            "bucket does not exist",
            1,
        ),
        (
            vec!["append", "-", "gs://test-bucket/o"],
            "standard input",
            1,
        ),
        (vec!["cp", src_s, work.path().to_str().unwrap()], "gs://", 1),
        (
            vec!["cp", "gs://test-bucket/final", "gs://test-bucket/x"],
            "mv",
            1,
        ),
        (
            vec!["mv", "gs://test-bucket/final", "gs://other-bucket/x"],
            "different buckets",
            1,
        ),
        (vec!["rm", "gs://test-bucket/nothing"], "not found", 1),
        (
            vec!["cp", work.path().to_str().unwrap(), "gs://test-bucket/d"],
            "directory",
            1,
        ),
        (vec!["cp", src_s], "", 2),
        (vec!["rm"], "", 2),
    ];
    let mut failures = Vec::new();
    for (args, says, code) in &cases {
        let out = Command::new(env!("CARGO_BIN_EXE_zonalfs"))
            .args(args)
            .env("STORAGE_EMULATOR_HOST", host)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines = err.lines().count();
        if out.status.code() != Some(*code) || !err.contains(says) || (*code == 1 && lines != 1) {
            failures.push(format!(
                "{args:?}: exit {:?}, stderr {err:?}",
                out.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(!tree.path("o").exists(), "nothing was written");
}

/// On a terminal `cp` shows its progress (bytes, rate, time left) on stderr,
/// as `gcloud storage cp` does; the run above, without one, showed none.
/// The terminal is a pseudo-terminal made by util-linux `script`.
#[test]
fn cp_shows_progress_on_a_terminal() {
    let tree = Tree::new();
    let emu = EmuChild::spawn(tree.root(), &[]);
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("p.bin");
    std::fs::write(&src, pattern(24 << 20, 2)).unwrap();
    let cmd = format!(
        "{} cp {} gs://test-bucket/p.bin",
        env!("CARGO_BIN_EXE_zonalfs"),
        src.display()
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .env("STORAGE_EMULATOR_HOST", &emu.addr)
        .stdin(Stdio::null())
        .output()
        .expect("run script(1)");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("gs://test-bucket/p.bin: 24.0 MiB / 24.0 MiB at"),
        "no progress line on the terminal: {shown:?}"
    );
    assert!(shown.contains("left"), "{shown:?}");
}
