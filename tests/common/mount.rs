//! Real-mount helpers shared by the mount test files: the `zonalfs` binary,
//! a `MountGuard` that always detaches its mount (also when a test panics),
//! a `Daemon` guard for a background `zonalfs mount`, mountinfo checks, a
//! metrics scraper and a file hasher.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{must_wait_until, BUCKET};

/// The zonalfs binary this build made.
pub fn zonalfs_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zonalfs"))
}

/// `zonalfs mount -f` as a child; on drop: killed, and the mountpoint detached.
pub struct MountGuard {
    pub child: Option<Child>,
    pub mountpoint: PathBuf,
}

/// Is `p` a mount point now (per /proc/self/mountinfo, its fields decoded)?
pub fn is_mounted(p: &Path) -> bool {
    zonalfs::fs::mountinfo::is_mounted(p)
}

impl MountGuard {
    pub fn mount(endpoint: &str, mountpoint: &Path, extra: &[&str]) -> MountGuard {
        let mut args = vec!["--endpoint", endpoint, "--anonymous", "--log-level", "warn"];
        args.extend_from_slice(extra);
        MountGuard::mount_args(mountpoint, &args)
    }

    /// `zonalfs mount -f BUCKET MOUNTPOINT ARGS...` (no endpoint or credential
    /// flags added), waiting until the mount is up.
    pub fn mount_args(mountpoint: &Path, args: &[&str]) -> MountGuard {
        let child = zonalfs_cmd()
            .args(["mount", "-f", BUCKET])
            .arg(mountpoint)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn zonalfs mount");
        let mut g = MountGuard {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
        };
        must_wait_until("the mount is up", Duration::from_secs(30), || {
            if is_mounted(mountpoint) {
                return true;
            }
            if let Some(c) = g.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = c.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    panic!("zonalfs mount exited early ({status}): {err}");
                }
            }
            false
        });
        g
    }

    /// SIGTERM, then the exit status; the mount must be gone.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        c.wait().expect("wait")
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.mountpoint) {
            zonalfs::fs::fuse::lazy_unmount(&self.mountpoint);
        }
    }
}

/// The background daemon of one mount, found by its command line; SIGKILLed
/// and its mount detached on drop, so a failing test leaks neither.
pub struct Daemon {
    pub pid: Option<i32>,
    pub mountpoint: PathBuf,
}

impl Daemon {
    /// The daemon serving `mountpoint` (if one runs), to be cleaned up.
    pub fn of(mountpoint: &Path) -> Daemon {
        Daemon {
            pid: daemon_pid(mountpoint),
            mountpoint: mountpoint.to_path_buf(),
        }
    }

    /// Waits (bounded) for the daemon to exit by itself and returns its wait
    /// status. It must be this process's child: call [`become_subreaper`]
    /// before starting it.
    pub fn wait_exit(&mut self, within: Duration) -> i32 {
        let pid = self.pid.expect("the daemon's pid (by its command line)");
        let mut status = 0;
        must_wait_until("the daemon exits", within, || {
            // SAFETY: waitpid(2) on our (adopted) child, WNOHANG.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            assert!(r >= 0, "waitpid: {}", std::io::Error::last_os_error());
            r == pid
        });
        self.pid = None;
        status
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            // SAFETY: kill(2)/waitpid(2) on the daemon this test started (it is
            // our child through PR_SET_CHILD_SUBREAPER).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        if is_mounted(&self.mountpoint) {
            zonalfs::fs::fuse::lazy_unmount(&self.mountpoint);
        }
    }
}

/// Makes this process adopt its orphaned descendants, so that a background
/// daemon (whose parent exits) is re-parented to it and can be waited for.
pub fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes plain integers and only
    // changes who reaps this process's orphans.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0);
}

/// The pid of the `zonalfs mount` process serving `mountpoint`.
pub fn daemon_pid(mountpoint: &Path) -> Option<i32> {
    let want = mountpoint.as_os_str().as_encoded_bytes();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        (args.len() > 2 && args[1] == b"mount" && args.contains(&want)).then_some(pid)
    })
}

/// GET /metrics over plain HTTP/1.1.
pub fn scrape(addr: &str) -> String {
    use std::io::Write;
    let mut c = std::net::TcpStream::connect(addr).expect("connect to metrics");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("response");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// A loopback address with a port free right now (for `--metrics-addr`).
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    l.local_addr().expect("addr").to_string()
}

/// The value of the first sample line of `metrics` starting with `name`.
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in:\n{metrics}"))
}

pub fn sha_file(p: &Path) -> Vec<u8> {
    let mut f = std::fs::File::open(p).expect("open");
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            return h.finalize().to_vec();
        }
        h.update(&buf[..n]);
    }
}
