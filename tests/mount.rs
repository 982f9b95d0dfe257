//! Real FUSE mounts over the emulator, read by ordinary file APIs. Every mount
//! is unmounted by a guard that also runs when the test fails.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::mount::*;
use common::*;
use sha2::{Digest, Sha256};

#[test]
fn mount_read_list_errors_and_clean_unmount() {
    let tree = Tree::new();
    let files = [
        ("big.bin", pattern(20 * (1 << 20) + 7, 1)),
        ("dir/a.txt", b"hello\n".to_vec()),
        ("dir/sub/deep.bin", pattern(3 * (1 << 20), 2)),
        ("empty", Vec::new()),
    ];
    for (n, d) in &files {
        tree.put(n, d);
    }
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let metrics_addr = free_addr();
    let mut m = MountGuard::mount(
        &format!("http://{}", emu.addr),
        mnt.path(),
        &[
            "--metrics-addr",
            &metrics_addr,
            "--memory-limit",
            "256MiB",
            "--read-only",
        ],
    );
    let root = mnt.path();

    for (n, d) in &files {
        assert_eq!(sha_file(&root.join(n)), Sha256::digest(d).to_vec(), "{n}");
        assert_eq!(
            std::fs::metadata(root.join(n)).expect("stat").len(),
            d.len() as u64
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(root)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["big.bin", "dir", "empty"]);
    assert!(std::fs::metadata(root.join("dir/sub"))
        .expect("stat")
        .is_dir());

    // Reads at odd offsets and sizes, and 8 concurrent readers of one file.
    let big = &files[0].1;
    let mut f = std::fs::File::open(root.join("big.bin")).expect("open");
    use std::io::{Seek, SeekFrom};
    for (off, len) in [
        (0u64, 4096usize),
        (12_345_678, 1 << 20),
        (big.len() as u64 - 10, 100),
    ] {
        f.seek(SeekFrom::Start(off)).expect("seek");
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            let n = f.read(&mut buf[got..]).expect("read");
            if n == 0 {
                break;
            }
            got += n;
        }
        let end = (off as usize + len).min(big.len());
        assert_eq!(&buf[..got], &big[off as usize..end]);
    }
    let want = Sha256::digest(big).to_vec();
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let p = root.join("big.bin");
            std::thread::spawn(move || sha_file(&p))
        })
        .collect();
    for r in readers {
        assert_eq!(r.join().expect("reader"), want);
    }

    // Error paths.
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(root.join("dir/a.txt"))
        .expect_err("write");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let e = std::fs::File::create(root.join("new.txt")).expect_err("create");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    let e = std::fs::metadata(root.join("missing")).expect_err("missing");
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    let e = std::fs::read_dir(root.join("dir/a.txt")).expect_err("not a dir");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTDIR));
    let e = std::fs::read(root.join("dir")).expect_err("is a dir");
    assert_eq!(e.raw_os_error(), Some(libc::EISDIR));

    // The metrics endpoint reports what happened.
    let metrics = scrape(&metrics_addr);
    let value = |name: &str| metric(&metrics, name);
    assert!(value("zonalfs_bytes_read_total") >= big.len() as f64);
    assert!(value("zonalfs_fuse_op_seconds_count{op=\"read\"}") > 0.0);
    assert!(
        value("zonalfs_fuse_op_errors_total{op=\"lookup\"}") >= 1.0,
        "ENOENT lookups"
    );
    assert_eq!(
        value("zonalfs_memory_bytes{kind=\"limit\"}"),
        (256u64 << 20) as f64
    );
    assert!(value("zonalfs_memory_bytes{kind=\"peak\"}") <= (256u64 << 20) as f64);
    assert!(value("zonalfs_open_streams") >= 1.0);
    // Every block came from the memory layer, warm or fresh.
    assert!(
        value("zonalfs_memory_allocations_total{pages=\"warm\"}")
            + value("zonalfs_memory_allocations_total{pages=\"fresh\"}")
            >= 1.0
    );
    assert!(value("zonalfs_memory_bytes{kind=\"warm\"}") <= (256u64 << 20) as f64);
    // (The window gauge counts readers active in the last 5 s, which a
    // loaded machine can outlast; block loads are a counter.)
    assert!(
        value("zonalfs_cache_misses_total") >= 1.0,
        "the sequential read went through prefetch blocks"
    );
    assert!(metrics.contains("zonalfs_prefetch_window_bytes{stat=\"max\"}"));

    drop(f);
    let status = m.stop();
    assert!(status.success(), "{status}");
    assert!(!is_mounted(root), "still mounted after SIGTERM");
}

#[test]
fn mount_refuses_bad_mountpoints() {
    let tree = Tree::new();
    tree.put("x", b"x");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let ep = format!("http://{}", emu.addr);
    let nonempty = tempfile::tempdir().expect("dir");
    std::fs::write(nonempty.path().join("f"), b"f").expect("write");
    let file = tempfile::NamedTempFile::new().expect("file");
    for (mp, needle) in [
        (PathBuf::from("/nonexistent/zonalfs-mnt"), "No such file"),
        (file.path().to_path_buf(), "not a directory"),
        (nonempty.path().to_path_buf(), "not empty"),
    ] {
        let out = zonalfs_cmd()
            .args(["mount", "-f", BUCKET])
            .arg(&mp)
            .args(["--endpoint", &ep, "--anonymous"])
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(1), "{mp:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{mp:?}: {err}");
        assert!(!is_mounted(&mp));
    }
}

#[test]
fn daemon_mode_notify_and_unmount_command() {
    let tree = Tree::new();
    let data = tree.put("f.bin", &pattern(5 << 20, 3));
    let emu = EmuChild::spawn(tree.root(), &[]);
    let ep = format!("http://{}", emu.addr);
    let mnt = tempfile::tempdir().expect("mountpoint");
    // A guard with no child: detaches the mount if the test fails half way.
    let _guard = MountGuard {
        child: None,
        mountpoint: mnt.path().to_path_buf(),
    };
    let notify_dir = tempfile::tempdir().expect("notify dir");
    let sock_path = notify_dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");

    // Without --foreground: returns 0 once the mount serves.
    let out = zonalfs_cmd()
        .args(["mount", BUCKET])
        .arg(mnt.path())
        .args(["--endpoint", &ep, "--anonymous"])
        .env("NOTIFY_SOCKET", &sock_path)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(mnt.path()), "serving when the command returned");
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).expect("readiness notification");
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(std::fs::read(mnt.path().join("f.bin")).expect("read"), data);

    // A second mount on the same place: a clear error, exit 1.
    let out = zonalfs_cmd()
        .args(["mount", BUCKET])
        .arg(mnt.path())
        .args(["--endpoint", &ep, "--anonymous"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already a mount point"));

    // A daemon that cannot start reports its error through the parent.
    let other = tempfile::tempdir().expect("dir");
    let out = zonalfs_cmd()
        .args(["mount", "no-such-bucket"])
        .arg(other.path())
        .args(["--endpoint", &ep, "--anonymous"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no-such-bucket"));
    assert!(!is_mounted(other.path()));

    // `zonalfs unmount`: the mount goes, and the daemon with it.
    let out = zonalfs_cmd()
        .arg("unmount")
        .arg(mnt.path())
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(mnt.path()));
}

/// Removes a file when dropped (a helper link installed for the test).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn mount_helper_and_mount_t_zonalfs() {
    let tree = Tree::new();
    let data = tree.put("d/f.txt", b"through mount(8)\n");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let ep = format!("http://{}", emu.addr);
    let opts = format!("ro,_netdev,endpoint={ep},anonymous,uid=4242,file_mode=0440");

    // The helper called directly, as mount(8) would.
    let bin = tempfile::tempdir().expect("dir");
    let out = zonalfs_cmd()
        .args(["install-helper", "--dir"])
        .arg(bin.path())
        .output()
        .expect("install-helper");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let helper = bin.path().join("mount.zonalfs");
    let mnt = tempfile::tempdir().expect("mountpoint");
    let _guard = MountGuard {
        child: None,
        mountpoint: mnt.path().to_path_buf(),
    };
    let out = Command::new(&helper)
        .arg(BUCKET)
        .arg(mnt.path())
        .args(["-o", &opts])
        .output()
        .expect("helper");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::metadata(mnt.path().join("d/f.txt")).expect("stat");
    use std::os::unix::fs::MetadataExt;
    assert_eq!((md.uid(), md.mode() & 0o777), (4242, 0o440));
    assert_eq!(
        std::fs::read(mnt.path().join("d/f.txt")).expect("read"),
        data
    );
    let out = zonalfs_cmd()
        .arg("unmount")
        .arg(mnt.path())
        .output()
        .expect("unmount");
    assert!(out.status.success());
    assert!(!is_mounted(mnt.path()));

    // `mount -t zonalfs`, through /sbin/mount.zonalfs (installed for the test
    // only if there is none, and removed after).
    let sbin = Path::new("/sbin/mount.zonalfs");
    if sbin.symlink_metadata().is_ok() {
        return; // a real installation: leave it alone
    }
    let out = zonalfs_cmd()
        .args(["install-helper", "--dir", "/sbin"])
        .output()
        .expect("install-helper /sbin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _remove = RemoveOnDrop(sbin.to_path_buf());
    let mnt2 = tempfile::tempdir().expect("mountpoint");
    let _guard2 = MountGuard {
        child: None,
        mountpoint: mnt2.path().to_path_buf(),
    };
    let out = Command::new("mount")
        .args(["-t", "zonalfs", BUCKET])
        .arg(mnt2.path())
        .args(["-o", &opts])
        .output()
        .expect("mount(8)");
    assert!(
        out.status.success(),
        "mount -t zonalfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(mnt2.path().join("d/f.txt")).expect("read"),
        data
    );
    let out = Command::new("umount")
        .arg(mnt2.path())
        .output()
        .expect("umount");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(mnt2.path()));
}

fn run_ok(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().expect("run tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn unmodified_programs_through_the_mount() {
    let tree = Tree::new();
    let big = tree.put("data/big.bin", &pattern(9 * (1 << 20) + 321, 5));
    tree.put("data/nested/a/b/c.txt", b"deep\n");
    tree.put("notes.txt", b"line1\nline2\nline3\n");
    let many = tree.path("many");
    std::fs::create_dir_all(&many).expect("mkdir");
    for i in 0..10_000 {
        std::fs::write(many.join(format!("f{i:05}")), i.to_string()).expect("write");
    }
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let mut m = MountGuard::mount(&format!("http://{}", emu.addr), mnt.path(), &[]);
    let root = mnt.path();
    let src = tree.root().join(BUCKET);

    // dd with several block sizes.
    for bs in ["4k", "128k", "1M", "4M"] {
        let out = run_ok(
            Command::new("dd")
                .arg(format!("if={}", root.join("data/big.bin").display()))
                .arg(format!("bs={bs}"))
                .arg("status=none"),
        );
        assert!(out == big, "dd bs={bs}");
    }
    // head / tail.
    let out = run_ok(
        Command::new("head")
            .args(["-c", "1000"])
            .arg(root.join("data/big.bin")),
    );
    assert_eq!(out, &big[..1000]);
    let out = run_ok(
        Command::new("tail")
            .args(["-c", "777"])
            .arg(root.join("data/big.bin")),
    );
    assert_eq!(out, &big[big.len() - 777..]);
    // find and ls -lR against the source tree (names; sizes via find -printf).
    let listing = |dir: &Path| {
        let out = run_ok(
            Command::new("find")
                .arg(".")
                .args(["-printf", "%y %s %p\\n"])
                .current_dir(dir),
        );
        let mut lines: Vec<String> = String::from_utf8_lossy(&out)
            .lines()
            .map(|l| {
                // Directory sizes differ between filesystems.
                if l.starts_with("d ") {
                    let p = l.splitn(3, ' ').nth(2).unwrap_or("");
                    format!("d {p}")
                } else {
                    l.to_string()
                }
            })
            .collect();
        lines.sort();
        lines
    };
    assert_eq!(listing(root), listing(&src), "find output differs");
    let ls = run_ok(Command::new("ls").arg("-lR").arg(root));
    assert!(String::from_utf8_lossy(&ls).lines().count() > 10_000);
    assert_eq!(
        std::fs::read_dir(root.join("many"))
            .expect("readdir")
            .count(),
        10_000
    );
    // cp -r, then compare every file.
    let copy = tempfile::tempdir().expect("copy");
    run_ok(
        Command::new("cp")
            .arg("-r")
            .arg(root.join("data"))
            .arg(copy.path()),
    );
    assert_eq!(
        std::fs::read(copy.path().join("data/big.bin")).expect("copy"),
        big
    );
    assert_eq!(
        std::fs::read(copy.path().join("data/nested/a/b/c.txt")).expect("copy"),
        b"deep\n"
    );
    // Python: seek/read and mmap.
    let script = format!(
        "import mmap,sys\nf=open({p:?},'rb')\nf.seek(12345)\nsys.stdout.buffer.write(f.read(100))\nm=mmap.mmap(f.fileno(),0,access=mmap.ACCESS_READ)\nsys.stdout.buffer.write(m[5000000:5000100])\n",
        p = root.join("data/big.bin").to_string_lossy()
    );
    let out = run_ok(Command::new("python3").args(["-c", &script]));
    let mut want = big[12345..12445].to_vec();
    want.extend_from_slice(&big[5_000_000..5_000_100]);
    assert_eq!(out, want);
    // 8 concurrent readers of 8 different files.
    let readers: Vec<_> = (0..8)
        .map(|i| {
            let p = root.join(format!("many/f{:05}", i * 1111));
            std::thread::spawn(move || (i, std::fs::read(p).expect("read")))
        })
        .collect();
    for r in readers {
        let (i, got) = r.join().expect("reader");
        assert_eq!(got, (i * 1111).to_string().as_bytes());
    }
    // stat.
    let out = run_ok(
        Command::new("stat")
            .args(["-c", "%s %F"])
            .arg(root.join("notes.txt")),
    );
    assert_eq!(String::from_utf8_lossy(&out).trim(), "18 regular file");

    let status = m.stop();
    assert!(status.success(), "{status}");
}

#[test]
fn config_file_with_flags_taking_precedence() {
    use std::os::unix::fs::MetadataExt;
    let tree = Tree::new();
    tree.put("f", b"cfg");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let dir = tempfile::tempdir().expect("dir");
    let cfg = dir.path().join("zonalfs.toml");
    std::fs::write(
        &cfg,
        format!(
            "endpoint = \"http://{}\"\nanonymous = true\nuid = 4343\nfile_mode = \"0440\"\nmetadata_ttl = \"5s\"\n",
            emu.addr
        ),
    )
    .expect("write config");
    let mnt = tempfile::tempdir().expect("mountpoint");
    let _guard = MountGuard {
        child: None,
        mountpoint: mnt.path().to_path_buf(),
    };
    let out = zonalfs_cmd()
        .args(["mount", BUCKET])
        .arg(mnt.path())
        .arg("--config")
        .arg(&cfg)
        .args(["--file-mode", "0400"])
        .env_remove("ZONALFS_UID")
        .output()
        .expect("mount");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let md = std::fs::metadata(mnt.path().join("f")).expect("stat");
    assert_eq!(md.uid(), 4343, "from the file");
    assert_eq!(md.mode() & 0o777, 0o400, "the flag wins over the file");
    run_ok(zonalfs_cmd().arg("unmount").arg(mnt.path()));

    // A bad file: one line, exit 2, nothing mounted.
    std::fs::write(&cfg, "no_such_option = 1\n").expect("write");
    let out = zonalfs_cmd()
        .args(["mount", BUCKET])
        .arg(mnt.path())
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("mount");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("unknown key 'no_such_option'"), "{err}");
    assert!(!is_mounted(mnt.path()));
}

#[test]
fn log_file_json_nonempty_and_list_ttl() {
    let tree = Tree::new();
    tree.put("a", b"a");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    std::fs::write(mnt.path().join("hidden"), b"under the mount").expect("write");
    let logs = tempfile::tempdir().expect("logs");
    let log = logs.path().join("zonalfs.log");
    let _guard = MountGuard {
        child: None,
        mountpoint: mnt.path().to_path_buf(),
    };
    let ep = format!("http://{}", emu.addr);
    // Not empty: refused without --nonempty, mounted with it.
    let out = zonalfs_cmd()
        .args(["mount", BUCKET])
        .arg(mnt.path())
        .args(["--endpoint", &ep, "--anonymous"])
        .output()
        .expect("mount");
    assert_eq!(out.status.code(), Some(1));
    let out = zonalfs_cmd()
        .args(["mount", BUCKET])
        .arg(mnt.path())
        .args([
            "--endpoint",
            &ep,
            "--anonymous",
            "--nonempty",
            "--list-ttl",
            "1h",
        ])
        .args(["--log-format", "json", "--log-file"])
        .arg(&log)
        .output()
        .expect("mount");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names = |p: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(mnt.path()), ["a"]);
    // Within --list-ttl the listing is reused: a new object shows up later.
    tree.put("b", b"b");
    assert_eq!(names(mnt.path()), ["a"]);
    run_ok(zonalfs_cmd().arg("unmount").arg(mnt.path()));
    // The daemon logged JSON lines to the file.
    let mut text = String::new();
    let mounted = wait_for(Duration::from_secs(10), || {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .find(|l| l.contains("\"mounted\""))
            .map(str::to_string)
    });
    let line = mounted.unwrap_or_else(|| panic!("no JSON 'mounted' line in:\n{text}"));
    assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
}

#[test]
fn stale_mount_after_sigkill_is_detected_and_recovered_with_force() {
    let tree = Tree::new();
    tree.put("x", b"x");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let ep = format!("http://{}", emu.addr);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let mut m = MountGuard::mount(&ep, mnt.path(), &[]);
    let c = m.child.take().expect("child");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
    let mut c = c;
    c.wait().expect("wait");
    m.child = None;
    assert!(
        is_mounted(mnt.path()),
        "a killed daemon leaves a stale mount"
    );
    let e = std::fs::metadata(mnt.path()).expect_err("stale");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN));

    let out = zonalfs_cmd()
        .args(["mount", BUCKET])
        .arg(mnt.path())
        .args(["--endpoint", &ep, "--anonymous"])
        .output()
        .expect("mount");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("stale mount") && err.contains("--force"),
        "{err}"
    );

    let out = zonalfs_cmd()
        .args(["mount", BUCKET])
        .arg(mnt.path())
        .args(["--endpoint", &ep, "--anonymous", "--force"])
        .output()
        .expect("mount --force");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(mnt.path().join("x")).expect("read"), b"x");
    run_ok(zonalfs_cmd().arg("unmount").arg(mnt.path()));
    assert!(!is_mounted(mnt.path()));
}

/// A mount (with a metrics endpoint) of a bucket whose directory `d` holds
/// files `f0`..`f{n-1}`, each holding its number. Fields drop in order: the
/// mount goes first.
struct DirMount {
    m: MountGuard,
    mnt: tempfile::TempDir,
    metrics_addr: String,
    _emu: EmuChild,
    _tree: Tree,
}

impl DirMount {
    fn new(n: usize) -> DirMount {
        let tree = Tree::new();
        for i in 0..n {
            tree.put(&format!("d/f{i}"), i.to_string().as_bytes());
        }
        let emu = EmuChild::spawn(tree.root(), &[]);
        let metrics_addr = free_addr();
        let mnt = tempfile::tempdir().expect("mountpoint");
        let m = MountGuard::mount(
            &format!("http://{}", emu.addr),
            mnt.path(),
            &["--metrics-addr", &metrics_addr],
        );
        DirMount {
            m,
            mnt,
            metrics_addr,
            _emu: emu,
            _tree: tree,
        }
    }
}

#[test]
fn ls_l_uses_readdirplus() {
    let mut d = DirMount::new(50);
    let out = run_ok(Command::new("ls").arg("-l").arg(d.mnt.path().join("d")));
    assert_eq!(String::from_utf8_lossy(&out).lines().count(), 51);
    let metrics = scrape(&d.metrics_addr);
    let lookups: f64 = metrics
        .lines()
        .find(|l| l.starts_with("zonalfs_fuse_op_seconds_count{op=\"lookup\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("lookup count");
    // Names and attributes came with the listing: no lookup per file.
    assert!(lookups <= 3.0, "{lookups} lookups for ls -l of 50 files");
    assert!(d.m.stop().success());
}

/// Closing a file opened for reading sends the daemon no FLUSH (it has
/// nothing to persist: FOPEN_NOFLUSH); closing one opened for writing does.
#[test]
fn a_read_only_close_sends_no_flush() {
    let mut d = DirMount::new(10);
    let flushes = || {
        metric(
            &scrape(&d.metrics_addr),
            "zonalfs_fuse_op_seconds_count{op=\"flush\"}",
        )
    };
    let opens = || {
        metric(
            &scrape(&d.metrics_addr),
            "zonalfs_fuse_op_seconds_count{op=\"open\"}",
        )
    };
    for i in 0..10 {
        let body = std::fs::read(d.mnt.path().join("d").join(format!("f{i}"))).expect("read");
        assert_eq!(body, i.to_string().as_bytes());
    }
    assert!(opens() >= 10.0, "the reads opened no files");
    assert_eq!(flushes(), 0.0, "closing read-only files sent FLUSH");
    std::fs::write(d.mnt.path().join("d").join("new"), b"written").expect("write");
    assert!(flushes() >= 1.0, "closing a written file sent no FLUSH");
    assert_eq!(
        std::fs::read(d.mnt.path().join("d").join("new")).expect("read back"),
        b"written"
    );
    assert!(d.m.stop().success());
}

/// After a directory is listed, looking up its files asks the service
/// nothing (the listing's metadata answers), and a name that is not there
/// is asked about once (a listing and a stat at once, then whether it is an
/// empty folder), and no more (the failed lookup is cached).
#[test]
fn listed_and_missing_names_do_not_go_to_the_service_again() {
    let mut d = DirMount::new(20);
    let calls = || {
        let metrics = scrape(&d.metrics_addr);
        let get = metric(&metrics, "zonalfs_gcs_requests_total{method=\"GetObject\"}");
        let list = metric(
            &metrics,
            "zonalfs_gcs_requests_total{method=\"ListObjects\"}",
        );
        (get, list)
    };
    let names: Vec<String> = std::fs::read_dir(d.mnt.path().join("d"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 20);
    let listed = calls();
    assert!(listed.1 >= 1.0, "the listing asked the service: {listed:?}");
    for n in &names {
        let md = std::fs::metadata(d.mnt.path().join("d").join(n)).expect("stat");
        assert!(md.is_file());
        let body = std::fs::read(d.mnt.path().join("d").join(n)).expect("read");
        assert_eq!(body, n.trim_start_matches('f').as_bytes());
    }
    assert_eq!(calls(), listed, "lookups of listed files asked the service");

    let missing = d.mnt.path().join("d").join("nope");
    assert!(std::fs::metadata(&missing).is_err());
    let first = calls();
    assert!(
        first.0 + first.1 - listed.0 - listed.1 <= 2.0,
        "one failed lookup: {listed:?} -> {first:?}"
    );
    for _ in 0..5 {
        let e = std::fs::metadata(&missing).expect_err("still missing");
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }
    assert_eq!(calls(), first, "failed lookups are cached");
    assert!(d.m.stop().success());
}

#[test]
fn replaced_object_gives_estale_to_old_handles_and_is_logged_with_a_request_id() {
    let tree = Tree::new();
    let v1 = tree.put("obj", &pattern(20 << 20, 7));
    let emu = EmuChild::spawn(tree.root(), &[]);
    let logs = tempfile::tempdir().expect("logs");
    let log = logs.path().join("z.log");
    let mnt = tempfile::tempdir().expect("mountpoint");
    let log_arg = log.to_string_lossy().to_string();
    let mut m = MountGuard::mount(
        &format!("http://{}", emu.addr),
        mnt.path(),
        &["--log-file", &log_arg, "--metadata-ttl", "0s"],
    );
    let path = mnt.path().join("obj");
    let mut old = std::fs::File::open(&path).expect("open v1");
    // Replace the object (a new generation) behind the open handle.
    std::fs::remove_file(tree.path("obj")).expect("rm");
    let v2 = tree.put("obj", &pattern(20 << 20, 8));
    use std::io::{Seek, SeekFrom};
    old.seek(SeekFrom::Start(15 << 20)).expect("seek");
    let mut buf = vec![0u8; 4096];
    let stale = match old.read(&mut buf) {
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::ESTALE), "{e}");
            true
        }
        Ok(n) => {
            assert_eq!(
                &buf[..n],
                &v1[15 << 20..(15 << 20) + n],
                "old bytes or ESTALE, never new"
            );
            false
        }
    };
    println!("stale: {stale}");
    // A new open sees the new content.
    let got = std::fs::read(&path).expect("read v2");
    assert!(got == v2, "new opens read the new generation");
    assert!(m.stop().success());
    if stale {
        let text = std::fs::read_to_string(&log).expect("log");
        let line = text
            .lines()
            .find(|l| l.contains("operation failed"))
            .unwrap_or_else(|| panic!("no failure logged:\n{text}"));
        assert!(
            line.contains("req=") && line.contains("op=\"read\""),
            "{line}"
        );
    }
}

#[test]
fn only_dir_direct_io_and_dash_o_options() {
    let tree = Tree::new();
    let big = tree.put("data/big.bin", &pattern(6 << 20, 11));
    tree.put("data/sub/x", b"x");
    tree.put("other/y", b"y");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let ep = format!("http://{}", emu.addr);
    let opts = "ro,only_dir=data,direct_io,dir_mode=0500";
    let mut m = MountGuard::mount(&ep, mnt.path(), &["-o", opts]);
    let mut names: Vec<String> = std::fs::read_dir(mnt.path())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["big.bin", "sub"], "only the prefix is served");
    assert_eq!(
        sha_file(&mnt.path().join("big.bin")),
        Sha256::digest(&big).to_vec()
    );
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(mnt.path().join("sub")).expect("stat");
    assert_eq!(md.mode() & 0o777, 0o500);
    assert!(m.stop().success());
}

#[test]
fn allow_other_and_statfs() {
    let tree = Tree::new();
    tree.put("pub.txt", b"for everyone\n");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let ep = format!("http://{}", emu.addr);
    let as_nobody = |path: &Path| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(path)
            .output()
            .expect("setpriv")
    };
    // Default: only the mounting user gets in.
    let mnt = tempfile::tempdir().expect("mountpoint");
    std::fs::set_permissions(
        mnt.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let mut m = MountGuard::mount(&ep, mnt.path(), &[]);
    let out = as_nobody(&mnt.path().join("pub.txt"));
    assert!(
        !out.status.success(),
        "another user read a mount without --allow-other"
    );
    // statfs answers (df / stat -f).
    let out = run_ok(
        Command::new("stat")
            .args(["-f", "-c", "%T %l"])
            .arg(mnt.path()),
    );
    assert!(
        String::from_utf8_lossy(&out).contains("255"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(m.stop().success());
    // --allow-other: everyone may read (0444 files, 0555 directories).
    let mut m = MountGuard::mount(&ep, mnt.path(), &["--allow-other"]);
    let out = as_nobody(&mnt.path().join("pub.txt"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, b"for everyone\n");
    assert!(m.stop().success());
}

/// The running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']);
    let mut num = || {
        parts
            .next()
            .and_then(|p| p.parse::<u32>().ok())
            .unwrap_or(0)
    };
    (num(), num()) >= (major, minor)
}

/// `--passthrough`: small finalized files are held whole in memory files and
/// the kernel serves their reads itself. Their bytes are right on every open,
/// and (where the kernel offers passthrough: 6.9 and later) no read of them
/// reaches the daemon; an appendable object stays on the normal path.
#[test]
fn passthrough_serves_small_files_from_the_kernel() {
    let tree = Tree::new();
    let files: Vec<(String, Vec<u8>)> = (0..12u64)
        .map(|i| {
            let name = format!("d/f{i:02}");
            let data = pattern(1000 + i as usize * 7919, 40 + i);
            tree.put(&name, &data);
            (name, data)
        })
        .collect();
    tree.put("d/log", b"appendable, still growing");
    tree.mark_appendable("d/log");
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let metrics_addr = free_addr();
    let mut m = MountGuard::mount(
        &format!("http://{}", emu.addr),
        mnt.path(),
        &["--metrics-addr", &metrics_addr, "--passthrough"],
    );
    for round in 0..2 {
        for (name, data) in &files {
            let got = std::fs::read(mnt.path().join(name)).expect("read");
            assert!(got == *data, "round {round}: {name} has the wrong bytes");
        }
    }
    let log = std::fs::read(mnt.path().join("d/log")).expect("read log");
    assert_eq!(log, b"appendable, still growing");
    let metrics = scrape(&metrics_addr);
    let value = |name: &str| metric(&metrics, name);
    let passthrough = value("zonalfs_passthrough_opens_total");
    let reads = value("zonalfs_fuse_op_seconds_count{op=\"read\"}");
    if kernel_at_least(6, 9) {
        assert_eq!(passthrough, 24.0, "every open of a small file, both rounds");
        assert!(
            (1.0..=3.0).contains(&reads),
            "only the appendable object's reads reach the daemon: {reads}"
        );
    } else {
        assert_eq!(passthrough, 0.0);
    }
    assert!(m.stop().success());
}
