//! `zonalfs cat`, `ls` and `stat` as a user runs them, against the emulator as a
//! child process found through STORAGE_EMULATOR_HOST or --endpoint.

mod common;

use std::process::{Command, Output};

use common::*;
use sha2::{Digest, Sha256};

fn zonalfs(args: &[&str], emulator_host: Option<&str>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_zonalfs"));
    c.args(args).env_remove("STORAGE_EMULATOR_HOST");
    if let Some(h) = emulator_host {
        c.env("STORAGE_EMULATOR_HOST", h);
    }
    c.output().expect("run zonalfs")
}

#[test]
fn cat_ls_stat_through_the_emulator() {
    let tree = Tree::new();
    let data = tree.put("data/big.bin", &pattern(20 * (1 << 20) + 11, 5));
    tree.put("data/small.txt", b"hello\n");
    tree.put("top.txt", b"top\n");
    let emu = EmuChild::spawn(tree.root(), &["--redirect-every", "2"]);
    let host = Some(emu.addr.as_str());

    let out = zonalfs(
        &["cat", "gs://test-bucket/data/big.bin", "--window", "3MiB"],
        host,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(Sha256::digest(&out.stdout), Sha256::digest(&data));

    let out = zonalfs(
        &[
            "cat",
            "gs://test-bucket/data/big.bin",
            "--offset",
            "1000",
            "--length",
            "5MiB",
        ],
        host,
    );
    assert!(out.status.success());
    assert_eq!(out.stdout, &data[1000..1000 + (5 << 20)]);

    // An explicit plaintext endpoint works too (with --anonymous).
    let ep = format!("http://{}", emu.addr);
    let out = zonalfs(
        &["ls", "gs://test-bucket", "--endpoint", &ep, "--anonymous"],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "gs://test-bucket/top.txt\ngs://test-bucket/data/\n"
    );
    let out = zonalfs(&["ls", "-l", "gs://test-bucket/data/"], host);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("20971531  ") && text.contains("gs://test-bucket/data/big.bin"),
        "{text}"
    );

    let out = zonalfs(&["stat", "gs://test-bucket/data/small.txt"], host);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("size: 6\n") && text.contains("finalized: true\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("crc32c: {:08x}\n", crc32c::crc32c(b"hello\n"))),
        "{text}"
    );
}

#[test]
fn tool_errors_are_one_line_and_nonzero() {
    let tree = Tree::new();
    tree.put("x", b"x");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let host = Some(emu.addr.as_str());
    for (args, needle) in [
        (
            vec!["cat", "gs://test-bucket/missing"],
            "gs://test-bucket/missing",
        ),
        (vec!["stat", "gs://no-such-bucket/x"], "no-such-bucket"),
        (vec!["cat", "s3://test-bucket/x"], "gs://"),
        (
            vec!["cat", "gs://test-bucket/x", "--offset", "5"],
            "past the end",
        ),
        (vec!["cat", "gs://test-bucket"], "names no object"),
    ] {
        let out = zonalfs(&args, host);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = zonalfs(
        &[
            "stat",
            "gs://test-bucket/x",
            "--endpoint",
            "http://127.0.0.1:1",
            "--anonymous",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to http://127.0.0.1:1"));
    let out = zonalfs(
        &["stat", "gs://test-bucket/x", "--endpoint", "ftp://x"],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must start with https://"));
}
