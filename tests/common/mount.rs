//! Real-mount helpers shared by the mount test files: the `zonalfs` binary,
//! a `MountGuard` that always detaches its mount (also when a test panics),
//! `/proc/mounts` checks, a metrics scraper and a file hasher.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::BUCKET;

/// The zonalfs binary this build made.
pub fn zonalfs_cmd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_zonalfs"))
}

/// `zonalfs mount -f` as a child; on drop: killed, and the mountpoint detached.
pub struct MountGuard {
    pub child: Option<Child>,
    pub mountpoint: PathBuf,
}

pub fn is_mounted(p: &Path) -> bool {
    let want = p.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == Some(want.as_str()))
        })
        .unwrap_or(false)
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
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(mountpoint) {
            if let Some(c) = g.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    let mut err = String::new();
                    if let Some(mut e) = c.stderr.take() {
                        let _ = e.read_to_string(&mut err);
                    }
                    panic!("zonalfs mount exited early ({status}): {err}");
                }
            }
            assert!(Instant::now() < deadline, "mount never appeared");
            std::thread::sleep(Duration::from_millis(20));
        }
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
