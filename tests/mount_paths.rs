//! Mount points whose paths need escaping (issue 11): the kernel writes space,
//! tab, newline and backslash in /proc/self/mountinfo as octal escapes, and
//! leaves non-ASCII bytes as they are. At each such path a mount must come up
//! and stay up (foreground and daemon mode), serve the bucket's bytes, refuse a
//! second mount, go with `zonalfs unmount PATH`, and a stale one (its daemon
//! SIGKILLed) must be refused without `--force` and replaced with it.
//!
//! One emulator per test serves every case; each case runs in a directory of
//! its own under one temporary directory.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use common::mount::*;
use common::*;

/// Mount-point names, each needing (or, for the non-ASCII one, not needing)
/// escaping in mountinfo.
const NAMES: &[&str] = &[
    "with space",
    "with\ttab",
    "new\nline",
    "back\\slash",
    // The text `\040` itself: escaped as `\134040`, must not decode to a space.
    "lit\\040eral",
    "données-日本",
    "trailing space ",
];

const FILE: &str = "dir/f.bin";

/// How long a daemon may take to exit after its mount was unmounted (it
/// polls mountinfo every 250 ms).
const EXIT_BOUND: Duration = Duration::from_secs(10);

struct Setup {
    _tree: Tree,
    emu: EmuChild,
    data: Vec<u8>,
    base: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        let tree = Tree::new();
        let data = tree.put(FILE, &pattern((1 << 20) + 123, 11));
        let emu = EmuChild::spawn(tree.root(), &[]);
        let base = tempfile::tempdir().expect("tempdir");
        Setup {
            _tree: tree,
            emu,
            data,
            base,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.emu.addr)
    }

    /// The (empty) mount point directory for `name`, absolute and canonical.
    fn mountpoint(&self, name: &str) -> PathBuf {
        let base = self.base.path().canonicalize().expect("canonical base");
        let mp = base.join(name);
        std::fs::create_dir(&mp).expect("mkdir mountpoint");
        mp
    }

    /// `zonalfs mount BUCKET MP` (daemon mode) with `extra` flags.
    fn daemon_mount(&self, mp: &Path, extra: &[&str]) -> Output {
        zonalfs_cmd()
            .args(["mount", BUCKET])
            .arg(mp)
            .args(["--endpoint", &self.endpoint(), "--anonymous"])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run zonalfs mount")
    }

    /// The file read through the mount at `mp` is the object's bytes.
    fn check_read(&self, mp: &Path) {
        let got = std::fs::read(mp.join(FILE))
            .unwrap_or_else(|e| panic!("read through the mount at {mp:?}: {e}"));
        assert!(got == self.data, "{mp:?}: wrong bytes through the mount");
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A failure is exit 1 and exactly one `zonalfs: error: ...` line.
fn assert_one_line_failure(out: &Output, needles: &[&str], mp: &Path) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{mp:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{mp:?}: not one line: {err:?}");
    assert!(err.starts_with("zonalfs: error: "), "{mp:?}: {err:?}");
    for n in needles {
        assert!(err.contains(n), "{mp:?}: no {n:?} in {err:?}");
    }
}

/// `zonalfs unmount MP` succeeds and the mount is gone.
fn unmount(mp: &Path) {
    let out = zonalfs_cmd()
        .arg("unmount")
        .arg(mp)
        .output()
        .expect("run zonalfs unmount");
    assert!(out.status.success(), "unmount {mp:?}: {}", stderr(&out));
    assert!(
        !is_mounted(mp),
        "{mp:?} still mounted after zonalfs unmount"
    );
}

/// Waits (bounded) for a foreground `zonalfs mount -f` to exit.
fn wait_child(c: &mut Child, mp: &Path) -> std::process::ExitStatus {
    wait_for(EXIT_BOUND, || c.try_wait().expect("try_wait"))
        .unwrap_or_else(|| panic!("{mp:?}: zonalfs mount -f still running after its mount went"))
}

/// Waits (bounded) until the mount at `mp`, whose daemon was killed, is
/// stale: ENOTCONN once the kernel's cached attributes of its root expire.
fn wait_stale(mp: &Path) {
    let mut last = None;
    let stale = wait_until(Duration::from_secs(10), || match std::fs::metadata(mp) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => true,
        r => {
            last = Some(r);
            false
        }
    });
    assert!(stale, "{mp:?}: not stale after the SIGKILL: {last:?}");
}

#[test]
fn foreground_mount_serves_and_unmounts_at_escaped_paths() {
    let s = Setup::new();
    for name in NAMES {
        let mp = s.mountpoint(name);
        let mut m = MountGuard::mount(&s.endpoint(), &mp, &[]);
        s.check_read(&mp);
        assert!(is_mounted(&mp), "{mp:?}: not mounted after a read");
        unmount(&mp);
        let mut c = m.child.take().expect("running");
        let status = wait_child(&mut c, &mp);
        let mut err = String::new();
        if let Some(mut e) = c.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        assert!(status.success(), "{mp:?}: exit {status}: {err}");
        // It stayed mounted until `zonalfs unmount`, and said so.
        assert!(err.contains("was unmounted"), "{mp:?}: {err}");
    }
}

#[test]
fn daemon_mount_serves_refuses_a_second_mount_and_unmounts_at_escaped_paths() {
    become_subreaper();
    let s = Setup::new();
    for name in NAMES {
        let mp = s.mountpoint(name);
        let out = s.daemon_mount(&mp, &[]);
        let mut daemon = Daemon::of(&mp);
        assert!(out.status.success(), "{mp:?}: {}", stderr(&out));
        assert!(
            is_mounted(&mp),
            "{mp:?}: not mounted when the command returned"
        );
        assert!(daemon.pid.is_some(), "{mp:?}: no daemon serves it");
        s.check_read(&mp);

        let again = s.daemon_mount(&mp, &[]);
        assert_one_line_failure(&again, &["already a mount point"], &mp);
        s.check_read(&mp);

        unmount(&mp);
        let status = daemon.wait_exit(EXIT_BOUND);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{mp:?}: daemon wait status {status:#x}"
        );
    }
}

#[test]
fn stale_mount_at_escaped_paths_is_refused_and_replaced_with_force() {
    become_subreaper();
    let s = Setup::new();
    for name in NAMES {
        let mp = s.mountpoint(name);
        let mut m = MountGuard::mount(&s.endpoint(), &mp, &[]);
        let mut c = m.child.take().expect("running");
        // SAFETY: kill(2) on our own, unreaped child.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
        c.wait().expect("wait");
        assert!(is_mounted(&mp), "{mp:?}: a killed daemon leaves its mount");
        wait_stale(&mp);

        let out = s.daemon_mount(&mp, &[]);
        assert_one_line_failure(&out, &["stale mount", "--force"], &mp);

        let out = s.daemon_mount(&mp, &["--force"]);
        let mut daemon = Daemon::of(&mp);
        assert!(out.status.success(), "{mp:?}: --force: {}", stderr(&out));
        assert!(is_mounted(&mp), "{mp:?}: not mounted after --force");
        s.check_read(&mp);
        unmount(&mp);
        let status = daemon.wait_exit(EXIT_BOUND);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "{mp:?}: daemon wait status {status:#x}"
        );
        drop(m);
    }
}
