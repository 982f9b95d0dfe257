//! Reading local files at an offset without an extra copy or a memset: the
//! emulator serves objects from files with these, and the upload tools read
//! their sources with them (into buffers that go on the wire as they are).
//! Also the mount's scratch files: unnamed files in `--temp-dir` that staged
//! writes copy objects into ([`scratch_file`]).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Names the fallback scratch files of this process apart.
static NEXT_SCRATCH: AtomicU64 = AtomicU64::new(0);

/// A new empty file in `dir` that no other program can open and that goes
/// away with its last descriptor: unnamed (`O_TMPFILE`), or where the file
/// system lacks that, a file of a name unique to this process and call,
/// removed at once.
pub fn scratch_file(dir: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let unnamed = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE)
        .open(dir);
    if let Ok(f) = unnamed {
        return Ok(f);
    }
    let path = dir.join(format!(
        ".zonalfs-scratch-{}-{}",
        std::process::id(),
        NEXT_SCRATCH.fetch_add(1, Ordering::Relaxed)
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    let _ = std::fs::remove_file(&path);
    Ok(f)
}

/// Reads exactly `len` bytes at `off` into a new buffer (left uninitialized
/// until `pread` fills it: no memset on the serving path), or fails if the file
/// is shorter.
pub fn pread_bytes(file: &File, off: u64, len: usize) -> std::io::Result<bytes::BytesMut> {
    use std::os::fd::AsRawFd;
    let mut buf = bytes::BytesMut::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        let spare = buf.spare_capacity_mut();
        let want = len - done;
        let at = libc::off_t::try_from(off + done as u64)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: `spare` is writable memory of at least `want` bytes owned by `buf`;
        // pread writes at most `want` bytes into it and the fd stays open (borrowed
        // from `file`) for the duration of the call.
        let n = unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), want, at) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "object shrank while being read",
            ));
        }
        // SAFETY: pread initialized the next `n` (<= want) bytes after `done`.
        unsafe { buf.set_len(done + n as usize) };
    }
    Ok(buf)
}

/// Reads exactly `buf.len()` bytes at `off`, or fails if the file is shorter.
pub fn read_exact_at(file: &File, buf: &mut [u8], mut off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], off)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "object shrank while being read",
            ));
        }
        done += n;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    /// Scratch files made at once in one directory are each their own, and
    /// leave no name behind.
    #[test]
    fn scratch_files_are_private_and_leave_no_name() {
        let dir = tempfile::tempdir().expect("dir");
        let mut files: Vec<File> = (0..4)
            .map(|_| scratch_file(dir.path()).expect("scratch file"))
            .collect();
        for (i, f) in files.iter_mut().enumerate() {
            f.write_all(format!("file {i}").as_bytes()).expect("write");
        }
        for (i, f) in files.iter_mut().enumerate() {
            let mut got = String::new();
            f.rewind().expect("rewind");
            f.read_to_string(&mut got).expect("read");
            assert_eq!(got, format!("file {i}"));
        }
        let names = std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(names, 0, "scratch files left names behind");
        assert!(scratch_file(&dir.path().join("missing")).is_err());
    }
}
