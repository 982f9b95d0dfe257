//! The mount as a library (`zonalfs::mount`): started in this process over an
//! in-memory client, and served on a `/dev/fuse` descriptor mounted by
//! someone else, as a Kubernetes CSI node plugin hands one over. Every mount
//! is detached by a guard that also runs when the test fails.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use zonalfs::fs::fuse;
use zonalfs::gcs::mem::MemClient;
use zonalfs::mount::{Ended, Mount, MountConfig, MountError, Objects};

/// Detaches whatever is mounted at the path when dropped.
struct Detach(PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        if fuse::is_mounted(&self.0) {
            fuse::lazy_unmount(&self.0);
        }
    }
}

fn objects() -> (Arc<MemClient>, Vec<u8>) {
    let client = MemClient::new(Duration::ZERO);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    client.put("dir/data.bin", data.clone(), true);
    client.put("hello.txt", b"hello\n".to_vec(), true);
    (client, data)
}

fn read(path: PathBuf) -> tokio::task::JoinHandle<std::io::Result<Vec<u8>>> {
    tokio::task::spawn_blocking(move || std::fs::read(path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_library_mount_serves_and_unmounts() {
    let dir = tempfile::tempdir().expect("mountpoint");
    let mp = dir.path().canonicalize().expect("canonical");
    let _guard = Detach(mp.clone());
    let (client, data) = objects();
    let cfg = MountConfig::new("memory", &mp);
    let m = Mount::start(&cfg, Objects::Client(client.clone()))
        .await
        .expect("mount");
    assert_eq!(m.mountpoint(), mp.as_path());
    assert!(fuse::is_mounted(&mp));
    let got = read(mp.join("dir/data.bin"))
        .await
        .expect("join")
        .expect("read");
    assert!(got == data, "the object's bytes");

    // A second mount at the same place is refused, and leaves the first.
    let again = Mount::start(&cfg, Objects::Client(client)).await;
    assert!(
        matches!(&again, Err(MountError::Mountpoint(m)) if m.contains("already a mount point")),
        "{:?}",
        again.err()
    );
    assert!(fuse::is_mounted(&mp));

    let ended = m.run_until(async {}).await.expect("unmount");
    assert_eq!(ended, Ended::Stopped);
    assert!(!fuse::is_mounted(&mp), "unmounted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_unmounted_from_outside_ends_its_run() {
    let dir = tempfile::tempdir().expect("mountpoint");
    let mp = dir.path().canonicalize().expect("canonical");
    let _guard = Detach(mp.clone());
    let (client, _) = objects();
    let m = Mount::start(&MountConfig::new("memory", &mp), Objects::Client(client))
        .await
        .expect("mount");
    let run = tokio::spawn(m.run_until(std::future::pending()));
    let mp2 = mp.clone();
    tokio::task::spawn_blocking(move || fuse::unmount_path(&mp2))
        .await
        .expect("join")
        .expect("umount");
    let ended = run.await.expect("join").expect("run");
    assert_eq!(ended, Ended::UnmountedOutside);
    assert!(!fuse::is_mounted(&mp));
}

/// Opens `/dev/fuse` and mounts it at `mp` as a CSI node plugin does (the
/// descriptor goes in the mount options), returning the descriptor.
fn mount_descriptor(mp: &Path) -> OwnedFd {
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .expect("/dev/fuse");
    let fd: OwnedFd = dev.into();
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (source, target, fstype) = (
        c("zonalfs:memory"),
        c(mp.to_str().expect("UTF-8 path")),
        c("fuse.zonalfs"),
    );
    let data = c(&format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
        fd.as_raw_fd()
    ));
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RDONLY,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(r, 0, "mount: {}", std::io::Error::last_os_error());
    fd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mount_serves_on_a_descriptor_mounted_elsewhere() {
    let dir = tempfile::tempdir().expect("mountpoint");
    let mp = dir.path().canonicalize().expect("canonical");
    let _guard = Detach(mp.clone());
    let fd = mount_descriptor(&mp);
    assert!(fuse::is_mounted(&mp));
    let (client, data) = objects();
    let m = Mount::serve_fd(
        &MountConfig::new("memory", &mp),
        Objects::Client(client),
        fd,
    )
    .await
    .expect("serve");
    assert_eq!(m.entry().mount_point, mp);
    let got = read(mp.join("hello.txt"))
        .await
        .expect("join")
        .expect("read");
    assert_eq!(got, b"hello\n");
    let got = read(mp.join("dir/data.bin"))
        .await
        .expect("join")
        .expect("read");
    assert!(got == data, "the object's bytes");
    m.unmount().await.expect("unmount");
    assert!(!fuse::is_mounted(&mp), "detached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_a_bucket() {
    let dir = tempfile::tempdir().expect("mountpoint");
    let mp = dir.path().canonicalize().expect("canonical");
    let _guard = Detach(mp.clone());
    let (client, _) = objects();
    let cfg = MountConfig {
        metrics_addr: Some("127.0.0.1:0".into()),
        ..MountConfig::new("memory", &mp)
    };
    let r = Mount::start(&cfg, Objects::Client(client)).await;
    assert!(matches!(r, Err(MountError::Config(_))), "{:?}", r.err());
    assert!(!fuse::is_mounted(&mp), "nothing left mounted");
}
