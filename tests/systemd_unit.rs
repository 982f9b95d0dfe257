//! The systemd unit is valid: `systemd-analyze verify` accepts it (with the
//! binary path pointed at the one this build made). And it restarts a crashed
//! daemon: `Restart=on-failure`, and its `ExecStart` line (run here as systemd
//! would run it, with the environment file's settings and a notify socket)
//! mounts again over the stale mount a SIGKILLed daemon left behind. No
//! systemd runs in the test environment, so the restart itself is simulated.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::mount::*;
use common::*;

#[test]
fn unit_verifies() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(manifest.join("systemd/zonalfs@.service")).expect("unit");
    assert!(unit.contains("Type=notify"));
    let unit = unit.replace("/usr/local/bin/zonalfs", env!("CARGO_BIN_EXE_zonalfs"));
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("zonalfs@test-bucket.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("zonalfs")).collect();
    assert!(out.status.success(), "{text}");
    assert!(ours.is_empty(), "systemd-analyze complained: {ours:?}");
}

fn unit_text() -> String {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(manifest.join("systemd/zonalfs@.service")).expect("unit")
}

/// The value of the unit's `key=` line in `[Service]`.
fn service_setting(unit: &str, key: &str) -> Option<String> {
    let mut in_service = false;
    unit.lines().find_map(|l| {
        let l = l.trim();
        if l.starts_with('[') {
            in_service = l == "[Service]";
            return None;
        }
        let (k, v) = l.split_once('=')?;
        (in_service && k.trim() == key).then(|| v.trim().to_string())
    })
}

/// `KEY=VALUE` lines of a systemd environment file (comments skipped,
/// surrounding quotes removed).
fn environment_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

/// Runs the unit's `ExecStart` for the instance `BUCKET` as systemd would:
/// `%i` expanded, the environment file's settings, `NOTIFY_SOCKET`; the
/// mount point and binary are this test's. Returns once READY=1 arrived.
fn exec_start(unit: &str, env: &[(String, String)], mountpoint: &Path) -> MountGuard {
    let line = service_setting(unit, "ExecStart").expect("ExecStart=");
    let line = line
        .replace("/mnt/gcs/%i", &mountpoint.to_string_lossy())
        .replace("%i", BUCKET)
        .replace("/usr/local/bin/zonalfs", env!("CARGO_BIN_EXE_zonalfs"));
    let argv: Vec<&str> = line.split_whitespace().collect();
    let notify_dir = tempfile::tempdir().expect("notify dir");
    let sock_path = notify_dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let child = Command::new(argv[0])
        .args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ExecStart");
    let guard = MountGuard {
        child: Some(child),
        mountpoint: mountpoint.to_path_buf(),
    };
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(is_mounted(mountpoint));
    guard
}

#[test]
fn unit_restarts_on_failure_and_exec_start_recovers_a_stale_mount() {
    let unit = unit_text();
    assert_eq!(
        service_setting(&unit, "Restart").as_deref(),
        Some("on-failure")
    );
    assert_eq!(
        service_setting(&unit, "EnvironmentFile").as_deref(),
        Some("-/etc/zonalfs/%i.env")
    );

    let tree = Tree::new();
    tree.put("hello.txt", b"hello from the bucket\n");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let etc = tempfile::tempdir().expect("etc");
    let env_path = etc.path().join(format!("{BUCKET}.env"));
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/zonalfs.env.example"),
    )
    .expect("env example");
    std::fs::write(
        &env_path,
        format!(
            "{example}ZONALFS_ENDPOINT=http://{}\nZONALFS_ANONYMOUS=true\nZONALFS_LOG=\"warn\"\n",
            emu.addr
        ),
    )
    .expect("env file");
    let env = environment_file(&std::fs::read_to_string(&env_path).expect("env file"));
    assert_eq!(env.len(), 3, "{env:?}");
    let mnt = tempfile::tempdir().expect("mountpoint");
    let file = mnt.path().join("hello.txt");

    let mut first = exec_start(&unit, &env, mnt.path());
    assert_eq!(
        std::fs::read(&file).expect("read"),
        b"hello from the bucket\n"
    );

    // --force does not take over a live mount.
    let line = service_setting(&unit, "ExecStart").expect("ExecStart=");
    assert!(line.contains(" --force "), "{line}");
    let mut c = first.child.take().expect("running");
    // SAFETY: kill(2) on our own child: the crash systemd would restart after.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
    c.wait().expect("wait");
    // Stale: ENOTCONN once the kernel's cached attributes (1 s) expire.
    let mut last = None;
    let stale = wait_until(Duration::from_secs(10), || {
        match std::fs::metadata(mnt.path()) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => true,
            r => {
                last = Some(r);
                false
            }
        }
    });
    assert!(stale, "not stale after the SIGKILL: {last:?}");

    // Restart=on-failure runs ExecStart again (here: without ExecStop having
    // cleaned up), and it must mount over the stale mount.
    let mut second = exec_start(&unit, &env, mnt.path());
    assert_eq!(
        std::fs::read(&file).expect("read after the restart"),
        b"hello from the bucket\n"
    );
    let status = second.stop();
    assert!(status.success(), "{status}");
    assert!(!is_mounted(mnt.path()));
    drop(first);
}

#[test]
fn exec_start_with_force_leaves_a_live_mount_alone() {
    let unit = unit_text();
    let tree = Tree::new();
    tree.put("a", b"a");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let ep = format!("http://{}", emu.addr);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let mut live = MountGuard::mount(&ep, mnt.path(), &[]);
    let line = service_setting(&unit, "ExecStart").expect("ExecStart=");
    let line = line
        .replace("/mnt/gcs/%i", &mnt.path().to_string_lossy())
        .replace("%i", BUCKET)
        .replace("/usr/local/bin/zonalfs", env!("CARGO_BIN_EXE_zonalfs"));
    let argv: Vec<&str> = line.split_whitespace().collect();
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .args(["--endpoint", &ep, "--anonymous"])
        .stdin(Stdio::null())
        .output()
        .expect("run ExecStart");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already a mount point"), "{err}");
    assert_eq!(std::fs::read(mnt.path().join("a")).expect("read"), b"a");
    assert!(live.stop().success());
}
