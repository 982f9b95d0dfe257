//! The `zonalfs emulator` command as a user runs it: readiness line, bad input,
//! and the counters it prints on SIGTERM.

mod common;

use std::process::Command;

use common::*;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_zonalfs"))
        .args(args)
        .output()
        .expect("run zonalfs")
}

fn one_line_error(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    err
}

#[test]
fn bad_root_is_a_one_line_error_with_exit_2() {
    let out = run(&[
        "emulator",
        "--root",
        "/nonexistent/zonalfs-root",
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line_error(&out).contains("--root /nonexistent/zonalfs-root"));
    let file = tempfile::NamedTempFile::new().expect("tmp file");
    let out = run(&[
        "emulator",
        "--root",
        file.path().to_str().expect("utf-8"),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line_error(&out).contains("not a directory"));
}

#[test]
fn address_in_use_is_a_one_line_error_with_exit_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let tree = Tree::new();
    let out = run(&[
        "emulator",
        "--root",
        tree.root().to_str().expect("utf-8"),
        "--listen",
        &addr,
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line_error(&out).contains(&addr));
}

#[test]
fn bad_flag_values_exit_2() {
    for args in [
        vec!["emulator", "--root", "/tmp", "--fail-open-rate", "2"],
        vec!["emulator", "--root", "/tmp", "--latency-ms", "abc"],
        vec!["emulator", "--root", "/tmp", "--no-such-flag"],
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_with_counters() {
    use zonalfs::proto::storage::storage_client::StorageClient;
    let tree = Tree::new();
    let data = tree.put("obj", &pattern(300_000, 1));
    let mut emu = EmuChild::spawn(tree.root(), &["--redirect-every", "1"]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", emu.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut c = StorageClient::new(channel);
    // First open is redirected; reopen with the handle and token, read it all.
    let st = Bidi::open(&mut c, spec("obj"), vec![], None)
        .await
        .err()
        .expect("redirect");
    use prost::Message;
    let rpc = zonalfs::proto::RpcStatus::decode(st.details()).expect("details");
    let redirect = zonalfs::proto::storage::BidiReadObjectRedirectedError::decode(
        rpc.details[0].value.as_slice(),
    )
    .expect("redirect detail");
    let mut s = spec("obj");
    s.read_handle = redirect.read_handle;
    let token = redirect.routing_token.expect("token");
    let mut b = Bidi::open(&mut c, s, vec![range(1, 0, 0)], Some(&token))
        .await
        .expect("reopen");
    let mut got = Vec::new();
    while got.len() < data.len() {
        let m = b.rx.message().await.expect("ok").expect("more");
        for d in m.object_data_ranges {
            got.extend_from_slice(&d.checksummed_data.expect("data").content);
        }
    }
    assert_eq!(got, data);
    drop(b);
    let (status, stderr) = emu.signal_and_wait(libc::SIGTERM);
    assert_eq!(status.code(), Some(0), "stderr: {stderr}");
    let last = stderr.lines().last().expect("a JSON line");
    assert!(last.starts_with('{') && last.ends_with('}'), "{last}");
    assert!(last.contains("\"streams_opened\":2"), "{last}");
    assert!(last.contains("\"ranges_served\":1"), "{last}");
    assert!(last.contains("\"bytes_served\":300000"), "{last}");
    assert!(last.contains("\"redirect\":1"), "{last}");
}
